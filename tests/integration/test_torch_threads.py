"""One thread owns a process's parallel torch work: the AsyncEngine builds and steps its engine on its own thread,
so the steps' OpenMP team keeps spinning between parallel regions instead of sleeping through each of them."""

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from fleetserve.engine.async_engine import AsyncEngine
from fleetserve.engine.torch_threads import run_on_own_thread
from fleetserve.errors import FleetServeError
from tests.helpers import engine_config

# Runs in a fresh process (libgomp's thread count is process-wide): builds an AsyncEngine the way a worker does,
# runs eight streams of 32 tokens, and reports each thread's CPU time and voluntary context switches (sleeps) over the steps.
SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys, threading
    from fleetserve.contract import SamplingParams
    from fleetserve.engine.async_engine import AsyncEngine
    from tests.helpers import engine_config

    def threads():
        out = {}
        for tid in os.listdir("/proc/self/task"):
            stat = open(f"/proc/self/task/{tid}/stat").read()
            fields = stat[stat.rindex(")") + 2 :].split()
            status = open(f"/proc/self/task/{tid}/status").read()
            sleeps = int(status.split("\\nvoluntary_ctxt_switches:")[1].split()[0])
            out[int(tid)] = (int(fields[11]) + int(fields[12]), sleeps)
        return out

    async def main():
        engine = await AsyncEngine.create(engine_config(num_threads=2), progress=False)
        params = SamplingParams(max_tokens=32, ignore_eos=True, temperature=0.0)

        async def stream(i):
            async for _ in engine.generate([1] + [100 + 37 * i + j for j in range(24)], params):
                pass

        await stream(99)  # the first steps load kernels: not measured
        before, steps = threads(), engine.stats().steps
        await asyncio.gather(*(stream(i) for i in range(8)))
        after = threads()
        report = {
            "engine": engine._thread.native_id,
            "main": threading.get_native_id(),
            "steps": engine.stats().steps - steps,
            "threads": {t: [after[t][0] - before[t][0], after[t][1] - before[t][1]] for t in after if t in before},
        }
        await engine.close()
        print(json.dumps(report))

    asyncio.run(main())
    """
)


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs for a two-thread team")
def test_the_steps_team_spins_between_regions():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, cwd=root, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["steps"] >= 32
    others = {int(t): v for t, v in report["threads"].items() if int(t) not in (report["engine"], report["main"])}
    # The team's second thread: the busiest thread besides the engine's (and the event loop's).
    cpu, sleeps = max(others.values())
    engine_cpu = report["threads"][str(report["engine"])][0]
    assert cpu > engine_cpu * 0.3, f"no second thread shared the steps' work: {report}"
    # A team that sleeps between regions wakes hundreds of times a step; a spinning one a few times at most.
    assert sleeps < 20 * report["steps"], f"the team's thread slept {sleeps} times in {report['steps']} steps"


def test_run_on_own_thread_returns_and_raises():
    main = threading.get_ident()

    def where() -> int:
        return threading.get_ident()

    def fail() -> None:
        raise ValueError("boom")

    async def run():
        ident = await run_on_own_thread(where)
        with pytest.raises(ValueError, match="boom"):
            await run_on_own_thread(fail)
        return ident

    ident = asyncio.run(run())
    assert ident != main
    for thread in [t for t in threading.enumerate() if t.ident == ident]:  # it may still be on its way out
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_a_failed_build_raises_from_create():
    async def run():
        with pytest.raises(FleetServeError):
            await AsyncEngine.create(engine_config(model="no-such-model-anywhere"), progress=False)

    asyncio.run(run())
