"""Workers the gateway starts on its own machine (the admin API's join), and their memory budget.

A joined worker is an ordinary ``fleetserve worker`` child process (a replica; a prefill or decode worker, with
``--role prefill|decode``; or a pipeline stage node, with ``--role stage``) that registers with this gateway like
any other; a :class:`~fleetserve.supervisor.Supervisor` starts it in its own process group, collects its output and
stops it. The cap of a worker that holds the whole model (replica, prefill, decode) is split into the model's
weights, a fixed allowance for the runtime and activations, and the KV cache (the rest); a cap that leaves less KV
than one request of ``MIN_KV_TOKENS`` needs is refused, with the amount that would do. A stage node's cap goes to
the worker whole (its weights plus KV): the gateway places layers within it. The fleet secret
and TLS material reach it in its environment, never in its arguments."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

from fleetserve.errors import InvalidRequestError
from fleetserve.gateway.registry import ROLES  # a joined worker may take any role: see the registry's
from fleetserve.model_files import model_arch
from fleetserve.protocol.security import FleetCredentials
from fleetserve.supervisor import DEFAULT_GRACE_S, Child, ChildSpec, Supervisor

log = logging.getLogger(__name__)

RUNTIME_OVERHEAD_MB = 256
"""Python, torch and the activations of one step, on top of the weights and the KV cache."""
MIN_KV_TOKENS = 2048


@dataclass
class MemoryPlan:
    weights_mb: int
    kv_per_token_bytes: int
    min_kv_mb: int

    @property
    def minimum_mb(self) -> int:
        return self.weights_mb + RUNTIME_OVERHEAD_MB + self.min_kv_mb

    def kv_mb(self, cap_mb: int) -> int:
        return cap_mb - self.weights_mb - RUNTIME_OVERHEAD_MB


def memory_plan(model: str, device: str) -> MemoryPlan:
    """Weights and KV sizes of ``model`` on ``device`` (float32 on CPU, bfloat16 on CUDA, as the engine picks)."""
    arch = model_arch(model)  # read from the model's config or GGUF metadata: nothing converted, no torch
    elem = 2 if device.startswith("cuda") else 4
    hidden, inter, layers = arch.hidden_size, arch.intermediate_size, arch.num_layers
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter + 2 * hidden
    if arch.qkv_bias:
        per_layer += q + 2 * kv
    params = arch.vocab_size * hidden * (1 if arch.tie_word_embeddings else 2) + layers * per_layer + hidden
    per_token = 2 * layers * kv * elem
    min_kv_tokens = min(MIN_KV_TOKENS, arch.max_position_embeddings or MIN_KV_TOKENS)
    return MemoryPlan(-(-params * elem // 2**20), per_token, -(-per_token * min_kv_tokens // 2**20))


def worker_sizing(model: str, device: str, memory_mb: int, role: str = "replica") -> tuple[int, int]:
    """(memory, KV cache) in MiB of one worker: for one that holds the whole model, ``memory_mb`` when given (refused
    when too small), else the model's minimum plus room for a few requests; for a stage node, its cap (default: the
    weights plus KV for MIN_KV_TOKENS) and no KV figure (it sizes its own within the layers it gets).
    UnknownModelError for a model it cannot read."""
    plan = memory_plan(model, device)
    if role == "stage":
        return memory_mb or plan.weights_mb + plan.min_kv_mb, 0
    if not memory_mb:
        memory_mb = plan.minimum_mb + 256
    if memory_mb < plan.minimum_mb:
        raise InvalidRequestError(
            f"max_memory_mb {memory_mb} is too small for {model} on {device}: it needs at least "
            f"{plan.minimum_mb} MiB ({plan.weights_mb} MiB of weights, {RUNTIME_OVERHEAD_MB} MiB for the runtime "
            f"and {plan.min_kv_mb} MiB of KV cache for {MIN_KV_TOKENS} tokens)",
            "max_memory_mb",
        )
    return memory_mb, plan.kv_mb(memory_mb)


WORKER_READY = "fleetserve worker ready"
CLOSE_GRACE_S = 10.0
"""How long each launched worker has to stop when the gateway shuts down."""


@dataclass
class LaunchedWorker:
    name: str
    model: str
    device: str
    role: str
    max_memory_mb: int
    kv_cache_mb: int
    child: Child

    @property
    def popen(self) -> subprocess.Popen:
        return self.child.popen  # type: ignore[return-value]

    @property
    def lines(self) -> list[str]:
        """Its latest output lines."""
        return self.child.output()

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "model": self.model,
            "device": self.device,
            "role": self.role,
            "max_memory_mb": self.max_memory_mb,
            "kv_cache_mb": self.kv_cache_mb,
            "pid": self.popen.pid,
            "running": self.popen.poll() is None,
        }


class Launcher:
    """Starts and stops local worker processes that register with ``control_address``, under a supervisor."""

    def __init__(self, control_address: str, credentials: FleetCredentials | None = None, threads: int | None = None):
        self.control_address = control_address
        self.credentials = credentials or FleetCredentials()
        self.threads = threads
        self.workers: dict[str, LaunchedWorker] = {}
        self.supervisor = Supervisor()
        self._names = itertools.count(1)

    async def join(
        self, model: str, device: str = "cpu", max_memory_mb: int | None = None, role: str = "replica"
    ) -> LaunchedWorker:
        if role not in ROLES:
            raise InvalidRequestError(f"role {role!r} cannot be launched here; use one of: {', '.join(ROLES)}", "role")
        if device != "cpu" and not device.startswith("cuda"):
            raise InvalidRequestError(f"device must be cpu or cuda[:N], not {device!r}", "device")
        # A stage node's cap is checked when it registers (at least one layer plus its KV for the context); the
        # gateway gives it the layers that fit. UnknownModelError for an unknown model.
        memory_mb, kv_mb = await asyncio.to_thread(worker_sizing, model, device, max_memory_mb or 0, role)
        return self._start(model, device, memory_mb, role, kv_mb)

    def _start(self, model: str, device: str, max_memory_mb: int, role: str, kv_mb: int) -> LaunchedWorker:
        """Start the worker process: a stage node with its whole cap, any other role with ``kv_mb`` of KV cache."""
        name = f"local-{next(self._names)}"
        while name in self.workers or name in self.supervisor:
            name = f"local-{next(self._names)}"
        args = [sys.executable, "-m", "fleetserve", "worker", "--gateway", self.control_address]
        args += ["--model", model, "--device", device, "--name", name]
        if role == "stage":
            args += ["--role", "stage", "--max-memory-mb", str(max_memory_mb)]
        else:
            args += ["--kv-cache-mb", str(kv_mb)] + (["--role", role] if role != "replica" else [])
        threads = self.threads or max(1, (os.cpu_count() or 1) // 2)
        args += ["--threads", str(threads)]
        env = self.credentials.child_env()  # the gateway's own certificate serves its local workers too
        child = self.supervisor.start(ChildSpec(name, args, env, ready=WORKER_READY, max_lines=200))
        worker = LaunchedWorker(name, model, device, role, max_memory_mb, kv_mb, child)
        self.workers[name] = worker
        log.info("launched %s %s (pid %d): %s on %s, %d MiB cap", role, name, child.pid, model, device, max_memory_mb)
        return worker

    async def stop(self, name: str, grace_s: float = DEFAULT_GRACE_S) -> int | None:
        """SIGTERM (the worker drains, deregisters and exits), then SIGKILL after ``grace_s``; the exit code."""
        if name not in self.workers:
            return None
        code = await self.supervisor.stop_async(name, grace_s)
        self.workers.pop(name, None)
        self.supervisor.discard(name)
        return code

    async def close(self) -> None:
        """Stop every launched worker, the latest first."""
        await self.supervisor.stop_all_async(CLOSE_GRACE_S)
        self.workers.clear()
