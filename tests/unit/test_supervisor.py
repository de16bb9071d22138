"""The process supervisor against real child processes (small Python scripts): readiness, failures, stopping, log
files, dying with the parent, and the keeper's restarts (on a fake clock: no test waits for a backoff)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import fleetserve
from fleetserve.supervisor import (
    Child,
    ChildExited,
    ChildSpec,
    Keeper,
    KeeperEvent,
    ReadyTimeout,
    RestartPolicy,
    Supervisor,
)

WAIT_S = 60.0  # generous: an outcome, not a speed, is what the tests check


def script(name: str, code: str, **options) -> ChildSpec:
    return ChildSpec(name, [sys.executable, "-c", textwrap.dedent(code)], **options)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def eventually(check, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def sup():
    s = Supervisor()
    yield s
    s.stop_all(grace_s=1.0)


SLEEPER = """
    import time
    print("booting")
    print("listening on port 4321")
    time.sleep(600)
"""


def test_wait_ready_returns_the_match(sup):
    child = sup.start(script("server", SLEEPER, ready=r"listening on port (\d+)"))
    match = child.wait_ready(WAIT_S)
    assert match.group(1) == "4321"
    assert child.running and child.pid is not None
    assert sup.wait_ready(WAIT_S)["server"].group(1) == "4321"


def test_a_ready_line_printed_just_before_exiting_still_counts(sup):
    child = sup.start(script("quick", "print('ready now')", ready="ready now"))
    assert child.wait_ready(WAIT_S).group(0) == "ready now"
    assert child.wait(WAIT_S) == 0


def test_exit_before_ready_raises_with_the_code_and_the_last_lines(sup):
    code = """
        import sys
        for i in range(50):
            print(f"line {i}")
        sys.exit(3)
    """
    child = sup.start(script("crasher", code, ready="never printed"))
    with pytest.raises(ChildExited) as info:
        child.wait_ready(WAIT_S)
    assert info.value.returncode == 3 and info.value.name == "crasher"
    assert info.value.lines == [f"line {i}\n" for i in range(20, 50)]
    assert "line 49" in str(info.value) and "code 3" in str(info.value)


def test_a_wait_that_runs_out_of_time_raises_with_the_last_lines(sup):
    child = sup.start(script("server", SLEEPER))
    child.wait_for("listening", WAIT_S)
    with pytest.raises(ReadyTimeout) as info:
        child.wait_for("never printed", timeout_s=0.2)
    assert info.value.lines == ["booting\n", "listening on port 4321\n"]
    assert isinstance(info.value, TimeoutError) and child.running


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace(sup):
    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM")
        time.sleep(600)
    """
    child = sup.start(script("stubborn", code, ready="ignoring"))
    child.wait_ready(WAIT_S)
    assert child.stop(grace_s=0.3) == -signal.SIGKILL
    assert not child.running and gone(child.pid)
    assert child.stop(grace_s=0.3) == -signal.SIGKILL  # stopping again only returns the code


def test_a_child_that_stops_on_sigterm_returns_its_own_code(sup):
    code = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
        print("up")
        time.sleep(600)
    """
    child = sup.start(script("polite", code, ready="up"))
    child.wait_ready(WAIT_S)
    assert sup.stop("polite", grace_s=WAIT_S) == 7
    assert sup.stop("nobody") is None


def test_stop_kills_a_grandchild_in_the_same_group(sup):
    code = """
        import subprocess, sys, time
        grandchild = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('grandchild ready'); time.sleep(600)"
        p = subprocess.Popen([sys.executable, "-c", grandchild])
        print(f"grandchild pid {p.pid}")
        time.sleep(600)
    """
    child = sup.start(script("parent", code))
    pid = int(child.wait_for(r"grandchild pid (\d+)", WAIT_S).group(1))
    child.wait_for("grandchild ready", WAIT_S)
    assert not gone(pid)
    child.stop(grace_s=WAIT_S)
    eventually(lambda: gone(pid), "the grandchild is still running")


def test_stop_all_stops_the_last_started_first(sup, tmp_path):
    log = tmp_path / "stopped"
    code = f"""
        import signal, sys, time
        def on_term(*_):
            with open({str(log)!r}, "a") as f:
                f.write(sys.argv[1] + "\\n")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        print("up")
        time.sleep(600)
    """
    for name in ("gateway", "worker-0", "worker-1"):
        spec = script(name, code, ready="up")
        spec.argv.append(name)
        sup.start(spec)
    sup.wait_ready(WAIT_S)
    assert sup.stop_all(grace_s=WAIT_S) == {"worker-1": 0, "worker-0": 0, "gateway": 0}
    assert log.read_text().split() == ["worker-1", "worker-0", "gateway"]
    assert sup.exited() == list(sup) and len(sup) == 3
    assert sup.stop_all(grace_s=WAIT_S) == {"worker-1": 0, "worker-0": 0, "gateway": 0}


def test_lines_are_collected_bounded_and_echoed(sup):
    code = """
        import sys
        print("out one")
        print("err two", file=sys.stderr)
        for i in range(20):
            print(f"n{i}")
        sys.stdout.write("no newline")
    """
    echo = io.StringIO()
    child = sup.start(script("talker", code, echo=echo, max_lines=5))
    assert child.wait(WAIT_S) == 0 and child.join_output(WAIT_S)
    assert child.output() == ["n16\n", "n17\n", "n18\n", "n19\n", "no newline\n"]
    assert child.tail(2) == ["n19\n", "no newline\n"]
    echoed = echo.getvalue().splitlines()
    assert echoed[:3] == ["[talker] out one", "[talker] err two", "[talker] n0"] and len(echoed) == 23


def test_env_additions_reach_the_child(sup):
    code = "import os; print('value=' + os.environ['FLEETSERVE_TEST_VALUE'])"
    child = sup.start(script("env", code, env={"FLEETSERVE_TEST_VALUE": "42"}))
    assert child.wait_for(r"value=(\d+)", WAIT_S).group(1) == "42"


def test_signals_pause_resume_and_kill(sup):
    child = sup.start(script("server", SLEEPER, ready="listening"))
    child.wait_ready(WAIT_S)
    process = psutil.Process(child.pid)
    assert child.signal(signal.SIGSTOP)
    eventually(lambda: process.status() == psutil.STATUS_STOPPED, "SIGSTOP did not pause the child")
    assert child.signal(signal.SIGCONT)
    eventually(lambda: process.status() != psutil.STATUS_STOPPED, "SIGCONT did not resume the child")
    assert child.kill() == -signal.SIGKILL
    assert not child.signal(signal.SIGTERM)  # it has exited: nothing to send to


def test_a_paused_child_still_stops(sup):
    child = sup.start(script("server", SLEEPER, ready="listening"))
    child.wait_ready(WAIT_S)
    child.signal(signal.SIGSTOP)
    assert child.stop(grace_s=WAIT_S) == -signal.SIGTERM


def test_names_are_unique_among_running_children(sup):
    sup.start(script("server", SLEEPER))
    with pytest.raises(ValueError, match="already running"):
        sup.start(script("server", SLEEPER))
    sup.stop("server", grace_s=WAIT_S)
    assert sup.start(script("server", SLEEPER)).running  # an exited child's name is free again


def test_a_child_started_again_keeps_its_record_and_waits_on_the_new_run():
    child = Child(script("once", "print('ready'); import time; time.sleep(600)", ready="ready")).launch()
    try:
        child.wait_ready(WAIT_S)
        first = child.pid
        child.kill()
        child.launch()
        assert child.restarts == 1 and child.pid != first and child.ready_match is None
        assert child.wait_ready(WAIT_S).group(0) == "ready"
    finally:
        child.kill()


def test_the_async_wait_and_stop():
    async def run() -> tuple[str, int | None, dict]:
        with Supervisor() as sup:
            child = sup.start(script("server", SLEEPER, ready=r"port (\d+)"))
            match = await child.wait_ready_async(WAIT_S)
            both = await sup.wait_ready_async(WAIT_S)
            code = await sup.stop_async("server", grace_s=WAIT_S)
            return match.group(1), code, both

    port, code, both = asyncio.run(run())
    assert port == "4321" and code == -signal.SIGTERM and both["server"].group(1) == "4321"


def test_the_async_wait_raises_when_the_child_exits():
    async def run() -> None:
        with Supervisor() as sup:
            sup.start(script("crasher", "print('bad config'); raise SystemExit(2)", ready="never"))
            await sup.wait_ready_async(WAIT_S)

    with pytest.raises(ChildExited) as info:
        asyncio.run(run())
    assert info.value.returncode == 2 and info.value.lines == ["bad config\n"]


def test_a_log_file_gets_every_run_with_a_line_at_each_start(tmp_path):
    path = tmp_path / "logs" / "child.log"  # the folder is made
    child = Child(script("logged", "import os; print(f'run of {os.getpid()}')", log_file=path))
    pids = []
    for _ in range(2):
        child.launch()
        assert child.wait(WAIT_S) == 0 and child.join_output(WAIT_S)
        pids.append(child.pid)
    lines = path.read_text().splitlines()
    assert [line.split(" at ")[0] for line in lines[::2]] == [f"--- started (pid {pid})" for pid in pids]
    assert lines[1::2] == [f"run of {pid}" for pid in pids] and lines[0].endswith(" ---")


def test_a_log_file_is_rotated_by_size(tmp_path):
    path = tmp_path / "child.log"
    code = "for i in range(100): print(f'line {i:03d}')"  # 9 bytes a line
    child = Child(script("chatty", code, log_file=path, log_max_bytes=100, log_backups=2)).launch()
    assert child.wait(WAIT_S) == 0 and child.join_output(WAIT_S)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.log", "child.log.1", "child.log.2"]
    assert all(0 < p.stat().st_size <= 100 for p in tmp_path.iterdir())
    kept = "".join((tmp_path / name).read_text() for name in ("child.log.2", "child.log.1", "child.log"))
    assert kept.splitlines()[-1] == "line 099"
    assert kept.splitlines() == [f"line {i:03d}" for i in range(100 - len(kept.splitlines()), 100)]


def test_a_log_file_that_cannot_be_written_does_not_stop_the_output(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    child = Child(script("talker", "print('still here')", log_file=blocker / "child.log")).launch()
    assert child.wait_for("still here", WAIT_S) and child.wait(WAIT_S) == 0


def test_a_child_that_exits_with_its_parent_gets_sigterm_when_the_parent_is_killed(tmp_path):
    marker = tmp_path / "got-sigterm"
    grandchild = f"""
        import pathlib, signal, sys, time
        from fleetserve.supervisor.parent_death import honour_parent_death
        assert honour_parent_death()
        def on_term(*_):
            pathlib.Path({str(marker)!r}).write_text("SIGTERM")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        print("grandchild ready")
        time.sleep(600)
    """
    parent = f"""
        import sys, textwrap, time
        from fleetserve.supervisor import ChildSpec, Supervisor
        code = textwrap.dedent({grandchild!r})
        child = Supervisor().start(ChildSpec("g", [sys.executable, "-c", code], ready="ready", exit_with_parent=True))
        child.wait_ready(60)
        print(f"grandchild pid {{child.pid}}", flush=True)
        time.sleep(600)
    """
    env = {**os.environ, "PYTHONPATH": str(Path(fleetserve.__file__).parents[1])}
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(parent)], stdout=subprocess.PIPE, text=True, env=env
    ) as p:
        try:
            line = p.stdout.readline()
            assert line.startswith("grandchild pid "), line
            pid = int(line.split()[-1])
        finally:
            p.kill()
    eventually(lambda: gone(pid), "the grandchild outlived its parent")
    eventually(marker.exists, "the grandchild did not get SIGTERM")


class Clock:
    """A keeper's clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


CRASHER = "import sys; print('starting'); print('bad config'); sys.exit(3)"


def tick_until(keeper: Keeper, kind: str) -> KeeperEvent:
    """Tick (real time passing, the fake clock not) until an event of ``kind``; the events before it must be none."""
    deadline = time.monotonic() + WAIT_S
    while not (events := keeper.tick()):
        assert time.monotonic() < deadline, f"no {kind} event"
        time.sleep(0.02)
    assert [e.kind for e in events] == [kind], events
    return events[0]


@pytest.fixture
def keeper_on_a_clock():
    clock = Clock()
    keeper = Keeper(clock=clock)
    yield keeper, clock
    keeper.close(grace_s=1.0)


def test_backoff_grows_by_the_factor_up_to_the_cap():
    policy = RestartPolicy(initial_backoff_s=1.0, max_backoff_s=30.0, factor=2.0)
    assert [policy.backoff(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert policy.backoff(0) == 1 and policy.backoff(10_000) == 30  # no overflow
    assert RestartPolicy(initial_backoff_s=0.5, factor=3.0, max_backoff_s=10).backoff(3) == 4.5
    with pytest.raises(ValueError, match="factor"):
        RestartPolicy(factor=0.5)
    with pytest.raises(ValueError, match="max_backoff_s"):
        RestartPolicy(initial_backoff_s=60)


def test_a_crashing_child_is_restarted_with_growing_backoff_until_it_is_crash_looping(keeper_on_a_clock):
    keeper, clock = keeper_on_a_clock
    keeper.keep(script("crasher", CRASHER))
    for wait in (1, 2, 4, 8):
        crashed = tick_until(keeper, "crashed")
        assert crashed.exit_code == 3 and crashed.lines == ["starting", "bad config"]
        assert crashed.detail.startswith("exited with code 3 after ") and crashed.detail.endswith(f"again in {wait}s")
        status = keeper.status("crasher")
        assert status.state == "backoff" and status.next_start_in_s == wait and status.pid is None
        clock.advance(wait - 0.5)
        assert keeper.tick() == []  # not yet
        clock.advance(0.5)
        [restarted] = keeper.tick()
        assert restarted.kind == "restarted" and f"(pid {keeper.status('crasher').pid})" in restarted.detail
    looping = tick_until(keeper, "crash-looping")
    assert "5 crashes within 120s" in looping.detail and looping.exit_code == 3
    status = keeper.status("crasher")
    assert (status.state, status.crashes, status.restarts, status.last_exit_code) == ("crash-looping", 5, 4, 3)
    assert status.last_lines == ["starting", "bad config"] and status.next_start_in_s == 0
    clock.advance(3600)
    assert keeper.tick() == []  # given up on: never started again by a tick
    keeper.reset("crasher")
    status = keeper.status("crasher")
    assert status.state == "running" and status.crashes == 0 and status.restarts == 5
    assert tick_until(keeper, "crashed").detail.endswith("again in 1s")  # the backoff starts over too


def test_crashes_older_than_the_window_do_not_count(keeper_on_a_clock):
    keeper, clock = keeper_on_a_clock
    policy = RestartPolicy(crash_loop_crashes=2, crash_loop_window_s=10.0)
    keeper.keep(script("crasher", CRASHER), policy)
    tick_until(keeper, "crashed")
    clock.advance(11)  # past the window
    assert keeper.tick()[0].kind == "restarted"
    tick_until(keeper, "crashed")
    assert keeper.status("crasher").crashes == 1
    clock.advance(2)
    keeper.tick()
    assert "2 crashes within 10s" in tick_until(keeper, "crash-looping").detail


def test_a_stable_run_sets_the_backoff_back(keeper_on_a_clock):
    keeper, clock = keeper_on_a_clock
    keeper.keep(script("crasher", CRASHER), RestartPolicy(stable_s=60.0, crash_loop_crashes=10))
    assert tick_until(keeper, "crashed").detail.endswith("in 1s")
    clock.advance(1)
    keeper.tick()
    assert tick_until(keeper, "crashed").detail.endswith("in 2s")
    clock.advance(2)
    keeper.tick()
    clock.advance(60)  # the run lasted stable_s on the keeper's clock before its crash was noticed
    crashed = tick_until(keeper, "crashed")
    assert " after 60.0s" in crashed.detail and crashed.detail.endswith("in 1s")


def test_a_clean_exit_is_not_restarted_unless_the_policy_says_so(keeper_on_a_clock):
    keeper, clock = keeper_on_a_clock
    keeper.keep(script("done", "print('all done')"))
    exited = tick_until(keeper, "exited")
    assert exited.exit_code == 0 and exited.lines == ["all done"] and "not started again" in exited.detail
    clock.advance(3600)
    assert keeper.tick() == [] and keeper.status("done").state == "exited"
    keeper.keep(script("again", "print('all done')"), RestartPolicy(restart_clean_exit=True))
    assert tick_until(keeper, "crashed").exit_code == 0
    clock.advance(1)
    assert [e.kind for e in keeper.tick()] == ["restarted"]


def test_a_released_or_stopped_child_is_not_a_crash(keeper_on_a_clock):
    keeper, clock = keeper_on_a_clock
    keeper.keep(script("server", SLEEPER, ready="listening")).wait_ready(WAIT_S)
    assert keeper.release("server", grace_s=WAIT_S) == -signal.SIGTERM
    other = keeper.keep(script("other", SLEEPER, ready="listening"))
    other.wait_ready(WAIT_S)
    other.stop(grace_s=WAIT_S)  # directly, not through the keeper
    assert other.join_output(WAIT_S)  # the keeper acts on an exit once its output has ended
    clock.advance(3600)
    assert keeper.tick() == []
    assert [(s.name, s.state, s.crashes, s.restarts, s.pid) for s in keeper.statuses()] == [
        ("server", "stopped", 0, 0, None),
        ("other", "stopped", 0, 0, None),
    ]
    with pytest.raises(ValueError, match="released"):
        keeper.reset("server")
    with pytest.raises(KeyError):
        keeper.release("nobody")
    assert keeper.keep(script("server", SLEEPER)).running  # a released name can be kept again


def test_status_says_starting_until_ready_and_serializes(keeper_on_a_clock):
    keeper, clock = keeper_on_a_clock
    keeper.keep(script("slow", SLEEPER, ready="never printed"))
    keeper.keep(script("plain", SLEEPER)).wait_for("listening", WAIT_S)
    clock.advance(5)
    slow, plain = keeper.statuses()
    assert (slow.state, plain.state) == ("starting", "running")
    assert plain.to_json() == {
        "name": "plain",
        "state": "running",
        "pid": keeper.supervisor["plain"].pid,
        "restarts": 0,
        "crashes": 0,
        "last_exit_code": None,
        "last_lines": [],
        "next_start_in_s": 0.0,
        "started_at": 1000.0,
        "uptime_s": 5.0,
    }
    json.dumps([s.to_json() for s in keeper.statuses()])
    with pytest.raises(ValueError, match="already kept"):
        keeper.keep(script("plain", SLEEPER))


def test_the_keeper_thread_restarts_reports_and_close_stops_everything_latest_first():
    events: list[KeeperEvent] = []
    keeper = Keeper(policy=RestartPolicy(initial_backoff_s=0.05, crash_loop_crashes=3), on_event=events.append)
    server = keeper.keep(script("server", SLEEPER, ready="listening"))
    keeper.keep(script("crasher", CRASHER))
    keeper.start_thread(interval_s=0.02)
    try:
        eventually(lambda: keeper.status("crasher").state == "crash-looping", "the crasher is not crash-looping")
        kinds = [e.kind for e in events]
        assert kinds == ["crashed", "restarted", "crashed", "restarted", "crash-looping"]
        assert events[-1].lines == ["starting", "bad config"]
        server.wait_ready(WAIT_S)
        assert keeper.status("server").state == "running"
    finally:
        codes = keeper.close(grace_s=WAIT_S)
    assert list(codes.items()) == [("crasher", 3), ("server", -signal.SIGTERM)]
    assert not server.running and keeper.tick() == []
    with pytest.raises(RuntimeError, match="closed"):
        keeper.keep(script("late", SLEEPER))


def test_an_exit_by_signal_is_described_and_a_failed_start_is_a_crash(keeper_on_a_clock, tmp_path):
    keeper, clock = keeper_on_a_clock
    program = tmp_path / "program"
    program.write_text("#!/bin/sh\necho up\nsleep 600\n")
    program.chmod(0o755)
    child = keeper.keep(ChildSpec("tool", [str(program)], ready="up"))
    child.wait_ready(WAIT_S)
    child.signal(signal.SIGKILL)
    assert tick_until(keeper, "crashed").detail.startswith("was killed by SIGKILL after ")
    program.unlink()
    clock.advance(1)
    crashed = keeper.tick()[0]
    assert crashed.kind == "crashed" and crashed.detail.startswith("could not be started again (")
    assert crashed.detail.endswith("trying again in 2s") and keeper.status("tool").state == "backoff"


def test_children_stopped_while_the_thread_runs_are_not_started_again():
    code = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(5))  # a stop that looks like a crash
        print("up")
        time.sleep(600)
    """
    events: list[KeeperEvent] = []
    supervisor = Supervisor()
    keeper = Keeper(supervisor, RestartPolicy(initial_backoff_s=0.0), on_event=events.append)
    for name in ("a", "b", "c"):
        keeper.keep(script(name, code, ready="up"))
    supervisor.wait_ready(WAIT_S)
    keeper.start_thread(interval_s=0.01)
    try:
        assert supervisor.stop("a", grace_s=WAIT_S) == 5  # directly, behind the keeper's back
        eventually(lambda: keeper.status("a").state == "stopped", "the keeper did not notice the stop")
    finally:
        codes = keeper.close(grace_s=WAIT_S)
    assert list(codes.items()) == [("c", 5), ("b", 5), ("a", 5)]
    assert events == [] and supervisor.exited() == list(supervisor)
