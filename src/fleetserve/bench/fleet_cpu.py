"""What the serving path costs in CPU: a local fleet's processes read from /proc around a benchmark row.

On a small machine the gateway, the worker's gRPC and event-loop threads and the load generator run on the cores
the engine's thread team fills, so their CPU time is what end to end loses against the engine alone. It moves
with the machine's speed as everything does: compare settings within one run, or each as a share of the engine's
own CPU (``engine_ms``), which moves with it. Linux only; elsewhere nothing is measured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_ticks(pid: int) -> dict[int, int]:
    """User plus system clock ticks spent by each thread of process ``pid`` (empty when /proc cannot tell)."""
    ticks: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return ticks
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # the name may hold spaces and parentheses
        ticks[int(tid)] = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


def fleet_processes(up_pid: int) -> dict[str, int]:
    """The gateway's and the worker's process ids among the children of `up` (process ``up_pid``), by role."""
    try:
        children = Path(f"/proc/{up_pid}/task/{up_pid}/children").read_text().split()
    except OSError:
        return {}
    found: dict[str, int] = {}
    for pid in children:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for role in ("gateway", "worker"):
            if role.encode() in argv[:4]:  # python -m fleetserve ROLE ...
                found.setdefault(role, int(pid))
    return found


@dataclass
class FleetCpu:
    """CPU time of one `up` fleet (a gateway and one worker whose engine runs ``engine_threads`` threads) and of
    this process, the load generator. ``snapshot`` before and after a row; ``per_request`` turns the two into
    milliseconds a request."""

    up_pid: int
    engine_threads: int
    processes: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> dict[str, dict[int, int] | float]:
        if not self.processes:
            self.processes = fleet_processes(self.up_pid)
        times = os.times()
        shot: dict[str, dict[int, int] | float] = {"client": times.user + times.system}
        for role, pid in self.processes.items():
            shot[role] = thread_ticks(pid)
        return shot

    def per_request(self, before: dict, after: dict, requests: int) -> dict[str, float] | None:
        """Milliseconds of CPU a request between two snapshots: the gateway (every thread), the worker's serving
        threads (all but its ``engine_threads`` busiest, the engine's team), the engine's team and the load
        generator. None when the fleet's processes could not be read."""
        if "gateway" not in after or "worker" not in after or requests <= 0:
            return None
        ms = 1000.0 / CLOCK_TICKS_PER_S / requests

        def spent(role: str) -> list[int]:
            return sorted((t - before.get(role, {}).get(tid, 0) for tid, t in after[role].items()), reverse=True)

        worker = spent("worker")
        return {
            "gateway_ms": sum(spent("gateway")) * ms,
            "worker_serving_ms": sum(worker[self.engine_threads :]) * ms,
            "engine_ms": sum(worker[: self.engine_threads]) * ms,
            "client_ms": (after["client"] - before["client"]) * 1000.0 / requests,
        }


def describe(cpu: dict[str, float]) -> str:
    """One line of a row's CPU a request."""
    return (
        f"CPU a request: gateway {cpu['gateway_ms']:.1f} ms, worker serving {cpu['worker_serving_ms']:.1f} ms, "
        f"engine {cpu['engine_ms']:.0f} ms, load generator {cpu['client_ms']:.1f} ms"
    )
