"""The serving path's CPU meter: per-thread CPU time from /proc, a fleet's processes found by role, and the split
of a worker's threads into the engine's team and the rest; and another process's peak RSS, read by its pid."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleetserve.bench.fleet_cpu import CLOCK_TICKS_PER_S, FleetCpu, fleet_processes, thread_ticks

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _spin(seconds: float, native_id: list[int], spun: threading.Event, release: threading.Event) -> None:
    """Spend ``seconds`` of this thread's own CPU time, say so, and stay alive until released."""
    native_id.append(threading.get_native_id())
    while time.thread_time() < seconds:
        pass
    spun.set()
    release.wait(30)


def test_a_running_threads_ticks_are_read_and_an_ended_ones_are_gone():
    tid: list[int] = []
    spun, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=_spin, args=(0.3, tid, spun, release))
    before = thread_ticks(os.getpid())
    worker.start()
    try:
        assert spun.wait(30)
        ticks = thread_ticks(os.getpid()).get(tid[0])
    finally:
        release.set()
        worker.join()
    assert tid[0] not in before
    assert ticks is not None and ticks >= 0.25 * CLOCK_TICKS_PER_S
    assert tid[0] not in thread_ticks(os.getpid())  # an ended thread leaves /proc with its ticks
    assert thread_ticks(2**31 - 1) == {}  # no such process


def test_the_fleets_processes_are_found_by_role_among_ups_children():
    sleeper = "import time; time.sleep(30)"
    children = [subprocess.Popen([sys.executable, "-c", sleeper, role]) for role in ("gateway", "worker", "other")]
    try:
        for child in children:  # a child shows its own command line only once it has exec'd
            deadline = time.monotonic() + 10
            while b"time.sleep" not in Path(f"/proc/{child.pid}/cmdline").read_bytes():
                assert time.monotonic() < deadline, "a child did not start"
                time.sleep(0.01)
        found = fleet_processes(os.getpid())
        assert found == {"gateway": children[0].pid, "worker": children[1].pid}
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert fleet_processes(2**31 - 1) == {}


def test_the_workers_busiest_threads_count_as_the_engine_and_the_rest_as_serving():
    meter = FleetCpu(up_pid=0, engine_threads=2, processes={"gateway": 1, "worker": 2})
    hz = CLOCK_TICKS_PER_S
    before = {"client": 1.0, "gateway": {10: 5, 11: 1}, "worker": {20: 100, 21: 100, 22: 10, 23: 5}}
    after = {
        "client": 1.5,
        "gateway": {10: 5 + hz, 11: 1, 12: hz},  # a thread started meanwhile counts from zero
        "worker": {20: 100 + 10 * hz, 21: 100 + 9 * hz, 22: 10 + hz, 23: 5},
    }
    cpu = meter.per_request(before, after, requests=10)
    assert cpu == pytest.approx(
        {"gateway_ms": 200.0, "worker_serving_ms": 100.0, "engine_ms": 1900.0, "client_ms": 50.0}
    )
    assert meter.per_request(before, {"client": 2.0}, requests=10) is None  # the fleet could not be read
    assert meter.per_request(before, after, requests=0) is None


def test_another_processs_peak_rss_is_read_by_its_pid():
    from fleetserve.bench.memory import peak_rss_bytes

    # the child touches 64 MiB, so its peak is well above a bare interpreter's and its own, not ours
    code = "import sys; b = bytearray(64 << 20); sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        peak = peak_rss_bytes(child.pid)
        assert peak is not None and peak >= 64 << 20
    finally:
        child.communicate("")
    assert peak_rss_bytes(child.pid) is None  # reaped: nothing to read, and no fallback to this process's figure
