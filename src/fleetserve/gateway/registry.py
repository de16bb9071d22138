"""Workers known to the gateway: registration, heartbeats, and a health state per worker.

States: healthy -> suspect -> dead. A worker becomes suspect when a heartbeat is late (two intervals) or when
``failure_threshold`` requests in a row failed on it; the gateway then probes it actively (a real one-token
generation). A heartbeat clears a late-heartbeat suspicion; only a successful probe clears a failure suspicion.
``heartbeat_timeout_s`` without a heartbeat, or ``failure_threshold`` failed probes, make it dead: it leaves
routing (policies forget it, its streams fail over) and stays listed as dead for ``dead_retention_s``, so that it
can come back under the same id. Draining workers finish what they have but get nothing new. Only healthy
workers are routable, and of the pipeline stage nodes only the heads of serving pipelines (``serving``).

The durable part (each worker's id, registration info, state and last sighting) is written to a
:class:`RegistryStore` when one is given: after a gateway restart the known workers are listed as dead until
they register again, which they do on their own, and get their old ids back.

Worker ids are random. Each registration also gets a random session secret, kept in memory only: heartbeats and
deregistrations must carry it (:meth:`WorkerRegistry.authenticate`), so knowing a worker's id is not enough to
speak for it. A worker's reported prefix-cache blocks are capped at its KV cache's size in blocks.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from fleetserve.gateway.registry_store import RegistryStore
from fleetserve.gateway.token_streams import TokenStreams
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import FleetCredentials

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]


REPLICA_ROLE = "replica"
"""A whole-model worker that serves whole requests (the default)."""
PREFILL_ROLE = "prefill"
"""A worker that computes prompts and hands their KV to a decode worker (it serves whole requests when no decode
worker is there)."""
DECODE_ROLE = "decode"
"""A worker that goes on from a prefill worker's KV (it serves whole requests when no prefill worker is there)."""
STAGE_ROLE = "stage"
"""The role of a pipeline stage node (``fleetserve worker --role stage``)."""
ROLES = (REPLICA_ROLE, PREFILL_ROLE, DECODE_ROLE, STAGE_ROLE)


def connector(credentials: FleetCredentials) -> Callable[[str], tuple[grpc.aio.Channel, pb_grpc.WorkerStub]]:
    """address -> (channel, Worker stub), the channel carrying ``credentials`` (secret, mutual TLS)."""

    def connect(address: str) -> tuple[grpc.aio.Channel, pb_grpc.WorkerStub]:
        channel = credentials.channel(address, options=CHANNEL_OPTIONS)
        # Connect now, at registration, not on the worker's first request (its first answer would wait for the
        # TCP, TLS and HTTP/2 handshakes).
        channel.get_state(try_to_connect=True)
        return channel, pb_grpc.WorkerStub(channel)

    return connect


def new_worker_id() -> str:
    return f"w-{uuid.uuid4().hex}"


class WorkerState(str, enum.Enum):
    HEALTHY = "healthy"
    SUSPECT = "suspect"
    DRAINING = "draining"
    DEAD = "dead"


@dataclass
class WorkerRecord:
    """What the gateway knows of one worker, and its channel."""

    worker_id: str
    info: pb.WorkerInfo
    registered_at: float
    last_heartbeat: float
    state: WorkerState = WorkerState.HEALTHY
    stats: pb.WorkerStats = field(default_factory=pb.WorkerStats)
    recent_first_token_s: float = 0.0
    recent_inter_token_s: float = 0.0
    in_flight: int = 0
    """Requests the gateway has sent to this worker and not yet seen finish."""
    reserved_tokens: int = 0
    """KV tokens admission has reserved on this worker for its in-flight requests."""
    block_hashes: set[int] = field(default_factory=set)
    """Prefix-cache block hashes the worker reported holding (kept current by heartbeat deltas)."""
    hashes_reported_at: float = 0.0
    """When the last heartbeat carrying block hashes arrived (registry clock); 0: never."""
    consecutive_failures: int = 0
    failed_probes: int = 0
    suspect_reason: str = ""
    """Why the worker is suspect: "heartbeat" (late) or "failures" (requests failed); empty otherwise."""
    serving: bool = True
    """Whether it serves requests of its own: a pipeline stage node only while it is the head of a serving pipeline
    (the gateway's PipelineController sets it); every other worker always."""
    session_secret: str = field(default="", repr=False)
    """Given to the worker when it registered; empty (a record restored from the store): nothing matches it."""
    sessions: dict[str, pb.PinnedSession] = field(default_factory=dict)
    """Conversation sessions whose KV the worker keeps pinned, by id, as its last heartbeat listed them."""
    heartbeats_via: str = ""
    """How its last heartbeat came: "direct" or "relay" (a heartbeat relay's batch)."""
    channel: grpc.aio.Channel | None = None
    stub: pb_grpc.WorkerStub | None = None
    token_streams: TokenStreams | None = None
    """The generations sent to it over ``stub`` (one call carries them all where the worker can); set and cleared
    with the stub."""

    @property
    def routable(self) -> bool:
        return self.state == WorkerState.HEALTHY and self.serving and self.stub is not None

    @property
    def name(self) -> str:
        return self.info.name


async def probe_generation(record: WorkerRecord, timeout_s: float) -> tuple[bool, str]:
    """A real one-token generation on the worker: whether it worked, and its detail or why not. The gRPC error's
    text goes to this log, not into the answer (which non-admin callers see)."""
    if record.stub is None:
        return False, "the worker has no connection"
    try:
        reply = await record.stub.Health(pb.HealthRequest(generate=True), timeout=timeout_s)
        return reply.ok, reply.detail
    except grpc.aio.AioRpcError as exc:
        log.info("generation probe of %s failed: %s: %s", record.name, exc.code().name, exc.details())
        return False, f"the probe failed: {exc.code().name}"
    except Exception as exc:  # any failure of the probe means it failed; the kind goes back to the caller
        log.info("generation probe of %s failed: %r", record.name, exc)
        return False, f"the probe failed: {type(exc).__name__}"


class WorkerRegistry:
    """The gateway's table of workers, updated by the Control service, request outcomes and a periodic sweep."""

    def __init__(
        self,
        heartbeat_interval_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        failure_threshold: int = 3,
        dead_retention_s: float = 300.0,
        store: RegistryStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        connect: Callable[[str], tuple[grpc.aio.Channel | None, pb_grpc.WorkerStub]] | None = None,
    ):
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.failure_threshold = max(1, failure_threshold)
        self.dead_retention_s = dead_retention_s
        self.store = store
        self.clock = clock
        self.connect = connect or connector(FleetCredentials())
        """address -> (channel, Worker stub); the gateway's carries its credentials, tests give one that makes no
        channel."""
        self.workers: dict[str, WorkerRecord] = {}
        self.generation = 0
        """Counts changes of membership (a worker added, replaced or removed), for indexes built over ``workers``."""
        self._members: dict[tuple[str, str | None], list[WorkerRecord]] = {}
        self._members_generation = -1
        self._holders: dict[int, str | set[str]] = {}
        """Block hash -> the id of the worker whose latest report lists it, or the set of them when several do."""
        self.on_dead: list[Callable[[WorkerRecord], None]] = []
        """Called when a worker stops being usable for good (dead, deregistered or replaced)."""
        self._closing: set[asyncio.Task] = set()
        if store is not None:
            self._restore(store)

    # -- membership ------------------------------------------------------------------------------------

    def _restore(self, store: RegistryStore) -> None:
        now = self.clock()
        for saved in store.load_workers():
            record = WorkerRecord(saved.worker_id, saved.info, now, now, state=WorkerState.DEAD)
            record.serving = saved.info.role != STAGE_ROLE
            self.workers[record.worker_id] = record
        self.generation += 1
        if self.workers:
            log.info("restored %d known worker(s); they are dead until they register again", len(self.workers))

    def register(
        self, info: pb.WorkerInfo, connection: tuple[grpc.aio.Channel | None, pb_grpc.WorkerStub] | None = None
    ) -> WorkerRecord:
        """Add a worker (or take it back: the same name and model at the same address keeps its id), with a fresh
        session secret. The caller has checked the fleet secret: an id alone never claims a record. ``connection``:
        a (channel, stub) already made for the worker (default: a new one)."""
        worker_id = None
        for old in [w for w in self.workers.values() if w.info.address == info.address]:
            if old.info.name == info.name and old.info.model == info.model:
                worker_id = old.worker_id
            self._drop(old)
        now = self.clock()
        worker_id = worker_id or new_worker_id()
        record = WorkerRecord(worker_id, info, now, now, session_secret=secrets.token_urlsafe(32))
        record.serving = info.role != STAGE_ROLE  # a stage node serves once it heads a pipeline
        record.channel, record.stub = connection or self.connect(info.address)
        record.token_streams = TokenStreams(record.stub) if record.stub is not None else None
        self.workers[worker_id] = record
        self.generation += 1
        self._persist(record)
        log.info("worker %s registered: %s at %s", worker_id, info.model, info.address)
        return record

    def remove(self, worker_id: str) -> WorkerRecord | None:
        """Forget a worker now (it deregistered)."""
        record = self.workers.get(worker_id)
        if record is not None:
            self._drop(record)
            log.info("worker %s removed", worker_id)
        return record

    def _drop(self, record: WorkerRecord) -> None:
        self.workers.pop(record.worker_id, None)
        self.generation += 1
        self._set_hashes(record, set())
        was_live = record.state != WorkerState.DEAD
        record.state = WorkerState.DEAD
        if was_live:
            self._notify_dead(record)
        self._close(record)
        if self.store is not None:
            self.store.delete_worker(record.worker_id)

    def authenticate(self, worker_id: str, session_secret: str) -> bool:
        """Whether ``session_secret`` is the one given to ``worker_id`` when it registered (constant time)."""
        record = self.workers.get(worker_id)
        if record is None or not record.session_secret:
            return False
        return hmac.compare_digest(record.session_secret.encode(), session_secret.encode())

    # -- state ------------------------------------------------------------------------------------------

    def heartbeat(self, report: pb.HeartbeatReport) -> WorkerRecord | None:
        """Apply a load report; None when the worker is unknown or was declared dead (it must register again)."""
        record = self.workers.get(report.worker_id)
        if record is None or record.state == WorkerState.DEAD:
            return None
        record.last_heartbeat = self.clock()
        record.stats = report.stats
        record.recent_first_token_s = report.recent_first_token_s
        record.recent_inter_token_s = report.recent_inter_token_s
        if report.HasField("block_hashes"):
            self._apply_hashes(record, report.block_hashes)
        record.sessions = {s.session_id: s for s in report.sessions}
        if report.draining:
            self._set(record, WorkerState.DRAINING)
        elif record.state == WorkerState.SUSPECT and record.suspect_reason == "heartbeat":
            self._set(record, WorkerState.HEALTHY)
        return record

    def _apply_hashes(self, record: WorkerRecord, delta: pb.BlockHashDelta) -> None:
        """Apply a block-hash delta, unless it would hold more blocks than the worker's KV cache has: such a
        report is dropped (and logged), and what was known before stays."""
        cap = record.info.kv_blocks_total
        old = record.block_hashes
        if delta.reset:
            held = len(set(delta.added))
        else:  # counted first, applied in place after: a heartbeat costs its delta, not the whole set
            listed = set(delta.added)
            gone = old.intersection(delta.removed) - listed  # a hash both removed and added stays
            added = listed - old
            held = len(old) - len(gone) + len(added)
        if held > cap:
            log.warning(
                "worker %s reported %d cached blocks, more than its %d KV blocks: block report ignored",
                record.worker_id,
                held,
                cap,
            )
            return
        if delta.reset:
            self._set_hashes(record, set(delta.added))
        else:
            old -= gone
            old |= added
            self._unindex(record.worker_id, gone)
            self._index(record.worker_id, added)
        record.hashes_reported_at = record.last_heartbeat

    def _set_hashes(self, record: WorkerRecord, hashes: set[int]) -> None:
        if record.block_hashes:
            self._unindex(record.worker_id, record.block_hashes)
        record.block_hashes = hashes
        self._index(record.worker_id, hashes)

    def _index(self, worker_id: str, hashes: set[int]) -> None:
        holders = self._holders
        for h in hashes:
            found = holders.get(h)
            if found is None:
                holders[h] = worker_id
            elif isinstance(found, set):
                found.add(worker_id)
            elif found != worker_id:
                holders[h] = {found, worker_id}

    def _unindex(self, worker_id: str, hashes: set[int]) -> None:
        holders = self._holders
        for h in hashes:
            found = holders.get(h)
            if found == worker_id:
                del holders[h]
            elif isinstance(found, set):
                found.discard(worker_id)
                if len(found) == 1:
                    holders[h] = next(iter(found))

    def holders_of(self, block_hash: int) -> tuple[str, ...]:
        """The ids of the workers whose latest report lists ``block_hash`` among their cached blocks."""
        found = self._holders.get(block_hash)
        if found is None:
            return ()
        return (found,) if isinstance(found, str) else tuple(found)

    def record_failure(self, record: WorkerRecord, detail: str = "") -> None:
        """A request failed on this worker; enough in a row make it suspect."""
        record.consecutive_failures += 1
        if record.consecutive_failures >= self.failure_threshold and record.state == WorkerState.HEALTHY:
            log.warning(
                "worker %s suspect after %d failed requests: %s", record.worker_id, record.consecutive_failures, detail
            )
            self._set(record, WorkerState.SUSPECT, "failures")

    def record_success(self, record: WorkerRecord) -> None:
        record.consecutive_failures = 0

    def fresh_start(self, record: WorkerRecord) -> None:
        """The worker took a new assignment (a pipeline stage): failures of its old role do not count against it."""
        record.consecutive_failures = 0
        if record.state == WorkerState.SUSPECT and record.suspect_reason == "failures":
            self._set(record, WorkerState.HEALTHY)

    def probe_result(self, record: WorkerRecord, ok: bool, detail: str = "") -> None:
        """The outcome of an active probe of a suspect worker."""
        if record.state != WorkerState.SUSPECT:
            return
        if ok:
            record.failed_probes = 0
            if record.suspect_reason == "failures":
                record.consecutive_failures = 0
                log.info("worker %s passed its probe: healthy again", record.worker_id)
                self._set(record, WorkerState.HEALTHY)
            return
        record.failed_probes += 1
        if record.failed_probes >= self.failure_threshold:
            self.mark_dead(record, f"{record.failed_probes} failed probes ({detail})")

    def mark_dead(self, record: WorkerRecord, reason: str) -> None:
        if record.state == WorkerState.DEAD:
            return
        log.warning("worker %s (%s) is dead: %s", record.worker_id, record.info.address, reason)
        self._set(record, WorkerState.DEAD)
        self._set_hashes(record, set())
        self._notify_dead(record)
        self._close(record)

    def sweep(self) -> list[WorkerRecord]:
        """Late heartbeats -> suspect, silent workers -> dead, long-dead ones forgotten; returns the new dead."""
        now = self.clock()
        dead = []
        for record in list(self.workers.values()):
            age = now - record.last_heartbeat
            if record.state == WorkerState.DEAD:
                if age > self.dead_retention_s:
                    self._drop(record)
            elif age > self.heartbeat_timeout_s:
                self.mark_dead(record, f"no heartbeat for {age:.1f}s")
                dead.append(record)
            elif age > 2 * self.heartbeat_interval_s and record.state == WorkerState.HEALTHY:
                self._set(record, WorkerState.SUSPECT, "heartbeat")
        return dead

    def suspects(self) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.state == WorkerState.SUSPECT and w.stub is not None]

    def _set(self, record: WorkerRecord, state: WorkerState, reason: str = "") -> None:
        if record.state == state and record.suspect_reason == reason:
            return
        record.state = state
        record.suspect_reason = reason if state == WorkerState.SUSPECT else ""
        if state != WorkerState.SUSPECT:
            record.failed_probes = 0
        if self.store is not None:
            self.store.update_state(record.worker_id, state.value, time.time())

    def _persist(self, record: WorkerRecord) -> None:
        if self.store is not None:
            now = time.time()
            self.store.save_worker(record.worker_id, record.info, record.state.value, now, now)

    def _notify_dead(self, record: WorkerRecord) -> None:
        for listener in self.on_dead:
            try:
                listener(record)
            except Exception:  # a listener's bug must not keep the registry from moving on
                log.exception("on_dead listener failed for %s", record.worker_id)

    def _close(self, record: WorkerRecord) -> None:
        channel, record.channel, record.stub = record.channel, None, None
        record.token_streams = None
        if channel is not None:
            # Closing cancels the calls still open on it, which makes their streams fail over elsewhere.
            task = asyncio.get_running_loop().create_task(channel.close(grace=None))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # -- queries ----------------------------------------------------------------------------------------

    def members(self, model: str, role: str | None = None) -> list[WorkerRecord]:
        """Every registered worker of ``model`` (with ``role``, of that role), in any state; kept per model and role
        between changes of membership, so that a request's routing looks only at its model's workers."""
        if self._members_generation != self.generation:
            members: dict[tuple[str, str | None], list[WorkerRecord]] = {}
            for w in self.workers.values():
                members.setdefault((w.info.model, None), []).append(w)
                members.setdefault((w.info.model, w.info.role or REPLICA_ROLE), []).append(w)
            self._members, self._members_generation = members, self.generation
        return self._members.get((model, role), [])

    def routable(self, model: str, role: str | None = None) -> list[WorkerRecord]:
        """Workers that take ``model``'s requests now; with ``role``, only those of that role."""
        return [w for w in self.members(model, role) if w.routable]

    def any_routable(self, model: str, role: str | None = None) -> bool:
        """Whether a worker takes ``model``'s requests now (with ``role``: one of that role)."""
        return any(w.routable for w in self.members(model, role))

    def models(self) -> list[str]:
        return sorted({w.info.model for w in self.workers.values()})
