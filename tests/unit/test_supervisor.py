"""The process supervisor against real child processes (small Python scripts): readiness, failures, stopping."""

from __future__ import annotations

import asyncio
import io
import signal
import sys
import textwrap
import time

import psutil
import pytest

from fleetserve.supervisor import Child, ChildExited, ChildSpec, ReadyTimeout, Supervisor

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
