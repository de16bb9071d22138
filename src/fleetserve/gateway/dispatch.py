"""One request's life on the workers: pick a worker, stream its token chunks, cancel it when the client goes.

gRPC statuses become typed errors here: INVALID_ARGUMENT -> InvalidRequestError, RESOURCE_EXHAUSTED ->
CapacityError, anything else -> UpstreamError.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator

import grpc

from fleetserve.engine.request import SamplingParams
from fleetserve.errors import CapacityError, InvalidRequestError, NoWorkerError, UpstreamError
from fleetserve.gateway.registry import WorkerRecord, WorkerRegistry
from fleetserve.protocol import convert
from fleetserve.protocol import fleet_pb2 as pb

log = logging.getLogger(__name__)


class Dispatcher:
    """Sends requests to healthy workers of their model, round-robin."""

    def __init__(self, registry: WorkerRegistry):
        self.registry = registry
        self._turn = itertools.count()

    def pick(self, model: str) -> WorkerRecord:
        workers = sorted(self.registry.routable(model), key=lambda w: w.worker_id)
        if not workers:
            raise NoWorkerError(f"no healthy worker serves {model!r} right now; retry shortly")
        return workers[next(self._turn) % len(workers)]

    async def generate(
        self, model: str, request_id: str, prompt: list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[tuple[WorkerRecord, pb.GenerateChunk]]:
        """Stream (worker, chunk) pairs; closing the iterator early cancels the call, which aborts on the worker."""
        worker = self.pick(model)
        request = pb.GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            params=convert.sampling_to_proto(params),
            priority=priority,
        )
        call = worker.stub.Generate(request, metadata=(("x-request-id", request_id),))
        worker.in_flight += 1
        try:
            async for chunk in call:
                yield worker, chunk
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequestError(details) from exc
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise CapacityError(details) from exc
            log.warning("worker %s failed request %s: %s %s", worker.worker_id, request_id, code.name, details)
            raise UpstreamError(f"worker {worker.info.name} failed: {code.name}: {details}") from exc
        finally:
            worker.in_flight -= 1
            call.cancel()  # no-op when the call is done; aborts the request on the worker otherwise
