"""The gateway runs no model code: serving a request through it never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Runs in a fresh interpreter: a gateway and a torch-free stub worker on one event loop, one chat request
# through the gateway's HTTP API, then a report of which heavy modules the process holds.
SCRIPT = r"""
import asyncio, json, sys
sys.path.insert(0, {tests!r})
import httpx
from fleetserve.gateway.main import run_gateway
from fleetserve.settings.gateway import GatewaySettings
from stub_worker import start_stub_worker, ANSWER

async def main():
    opts = GatewaySettings(port={port}, control_port={control})
    gateway = asyncio.create_task(run_gateway(opts))
    server, agent, task = await start_stub_worker("127.0.0.1:{control}")
    await asyncio.wait_for(agent.registered.wait(), 60)
    async with httpx.AsyncClient(base_url="http://127.0.0.1:{port}", timeout=60) as client:
        for _ in range(100):
            if (await client.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        reply = await client.post("/v1/chat/completions", json={{"model": "smollm2-135m-instruct",
            "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 8}})
    status = (await asyncio.to_thread(open, "/proc/self/status")).read()
    rss = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmRSS"))
    print(json.dumps({{"status": reply.status_code, "text": reply.json()["choices"][0]["message"]["content"],
        "answer": ANSWER, "modules": sorted(m for m in ("torch", "safetensors", "fleetserve.engine",
        "fleetserve.worker.server") if m in sys.modules), "rss_kib": rss}}))
    # Everything stops before the loop closes: a gRPC server left to the interpreter's teardown can crash it.
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await server.stop(None)
    gateway.cancel()
    await asyncio.gather(gateway, return_exceptions=True)

asyncio.run(main())
"""


def test_gateway_serves_without_importing_torch():
    from fleetserve.model_files import DEFAULT_MODEL, prepare_model_dir
    from tests.fleet import free_port

    prepare_model_dir(DEFAULT_MODEL, progress=False)  # the stub reads the model's files; converting them is not ours
    script = SCRIPT.format(tests=str(Path(__file__).parents[1]), port=free_port(), control=free_port())
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == 200
    assert report["text"] == report["answer"]
    assert report["modules"] == [], f"the gateway process imported {report['modules']}"
