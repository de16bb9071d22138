"""Both gRPC planes of a real fleet refuse callers without the fleet secret, forged heartbeats change nothing,
bad messages leave a worker serving, and registrations are held to the gateway's rules."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import grpc
import httpx
import pytest

from fleetserve.contract import SamplingParams
from fleetserve.protocol import convert
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import SECRET_ENV, FleetCredentials
from tests.fleet import FLEET_SECRET, free_port, spawn, start_fleet

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
TWO_TOKENS = convert.sampling_to_proto(SamplingParams(max_tokens=2, ignore_eos=True))
WORKER_RPCS = {
    "Generate": pb.GenerateRequest(request_id="x", prompt_token_ids=[1, 2, 3], params=TWO_TOKENS),
    "GenerateStreams": pb.StreamedRequest(
        start=pb.GenerateRequest(request_id="x", prompt_token_ids=[1, 2, 3], params=TWO_TOKENS)
    ),
    "Abort": pb.AbortRequest(request_id="x"),
    "Stats": pb.StatsRequest(),
    "Health": pb.HealthRequest(generate=True),
    "GetTokenizer": pb.TokenizerRequest(),
}
CONTROL_RPCS = ("Register", "Heartbeat", "Deregister")
CALLERS = {"no secret": FleetCredentials(), "wrong secret": FleetCredentials("not-the-fleet-secret")}


@pytest.fixture(scope="module")
def fleet(model_dir):
    f = start_fleet(2, "", 3.0)
    f.addresses = {w.wait_for(re.compile(r"ready: (\S+) at (\S+),")).group(2) for w in f.workers}
    yield f
    f.stop()


def routing(fleet) -> dict[str, dict]:
    return {w["name"]: w for w in httpx.get(fleet.url + "/admin/routing", timeout=10).json()["workers"]}


async def _call(creds: FleetCredentials, address: str, rpc: str, request, options=None):
    async with creds.channel(address, options) as channel:
        method = getattr(pb_grpc.WorkerStub(channel), rpc)
        if rpc == "Generate":
            return [chunk async for chunk in method(request, timeout=60)]
        if rpc == "GenerateStreams":

            async def messages():
                yield request

            return [batch async for batch in method(messages(), timeout=60)]
        return await method(request, timeout=60)


def worker_code(creds: FleetCredentials, address: str, rpc: str, request=None) -> str:
    try:
        asyncio.run(_call(creds, address, rpc, request or WORKER_RPCS[rpc]))
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


async def _control(creds: FleetCredentials, control: str, rpc: str, **fields):
    async with creds.channel(control) as channel:
        stub = pb_grpc.ControlStub(channel)
        if rpc == "Register":
            return await stub.Register(pb.RegisterRequest(info=fields["info"]), timeout=30)
        if rpc == "Deregister":
            return await stub.Deregister(pb.DeregisterRequest(**fields), timeout=30)

        async def reports():
            yield pb.HeartbeatReport(**fields)

        return [command async for command in stub.Heartbeat(reports(), timeout=30)]


def control_error(creds: FleetCredentials, control: str, rpc: str, **fields) -> grpc.aio.AioRpcError | None:
    try:
        asyncio.run(_control(creds, control, rpc, **fields))
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


def fake_info(name: str, address: str, model: str = MODEL, fingerprint: str = "") -> pb.WorkerInfo:
    return pb.WorkerInfo(
        name=name, address=address, model=model, kv_blocks_total=8, block_size=16, tokenizer_fingerprint=fingerprint
    )


@pytest.mark.parametrize("caller", sorted(CALLERS))
@pytest.mark.parametrize("rpc", sorted(WORKER_RPCS))
def test_every_worker_rpc_needs_the_secret(fleet, rpc, caller):
    address = sorted(fleet.addresses)[0]
    assert worker_code(CALLERS[caller], address, rpc) == "UNAUTHENTICATED"
    assert worker_code(FleetCredentials(FLEET_SECRET), address, rpc) == "OK"


@pytest.mark.parametrize("caller", sorted(CALLERS))
@pytest.mark.parametrize("rpc", CONTROL_RPCS)
def test_every_control_rpc_needs_the_secret(fleet, rpc, caller):
    before = routing(fleet)
    victim = before["worker-0"]
    fields = {
        "Register": {"info": fake_info("worker-0", victim["address"])},
        "Heartbeat": {"worker_id": victim["worker_id"], "draining": True},
        "Deregister": {"worker_id": victim["worker_id"]},
    }[rpc]
    error = control_error(CALLERS[caller], fleet.control, rpc, **fields)
    assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED
    after = routing(fleet)
    assert {n: (w["worker_id"], w["state"]) for n, w in after.items()} == {
        n: (w["worker_id"], w["state"]) for n, w in before.items()
    }


def test_a_stolen_worker_id_cannot_heartbeat_or_deregister(fleet):
    creds = FleetCredentials(FLEET_SECRET)  # even a holder of the fleet secret cannot speak for another worker
    victim = routing(fleet)["worker-0"]
    forged = {"draining": True, "block_hashes": pb.BlockHashDelta(reset=True, added=range(1, 5001))}
    for session in ("", "guessed-session-secret"):
        error = control_error(
            creds, fleet.control, "Heartbeat", worker_id=victim["worker_id"], session_secret=session, **forged
        )
        assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED
        error = control_error(creds, fleet.control, "Deregister", worker_id=victim["worker_id"], session_secret=session)
        assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED
    time.sleep(1.5)  # a heartbeat interval: anything applied would show
    after = routing(fleet)["worker-0"]
    assert after["worker_id"] == victim["worker_id"] and after["state"] == "healthy"
    assert after["cached_blocks_reported"] <= after["kv_blocks_total"] < 5000
    assert fleet.ready()["models"][MODEL]["healthy_workers"] == 2


def test_a_registered_worker_cannot_report_more_blocks_than_it_has(fleet):
    creds = FleetCredentials(FLEET_SECRET)
    files = asyncio.run(_call(creds, sorted(fleet.addresses)[0], "GetTokenizer", pb.TokenizerRequest()))
    info = fake_info("oversharer", f"127.0.0.1:{free_port()}", fingerprint=files.fingerprint)
    reply = asyncio.run(_control(creds, fleet.control, "Register", info=info))
    ids = {"worker_id": reply.worker_id, "session_secret": reply.session_secret}
    try:
        hashes = pb.BlockHashDelta(reset=True, added=range(1, 5001))
        commands = asyncio.run(_control(creds, fleet.control, "Heartbeat", draining=True, block_hashes=hashes, **ids))
        assert commands == []
        mine = routing(fleet)["oversharer"]
        assert mine["state"] == "draining" and mine["cached_blocks_reported"] == 0
    finally:
        asyncio.run(_control(creds, fleet.control, "Deregister", **ids))
    assert "oversharer" not in routing(fleet)


def test_bad_messages_are_refused_and_the_worker_keeps_serving(fleet):
    address = sorted(fleet.addresses)[0]
    creds = FleetCredentials(FLEET_SECRET)

    async def raw(method: str, payload: bytes) -> str:
        async with creds.channel(address, [("grpc.max_send_message_length", -1)]) as channel:
            call = channel.unary_unary(f"/fleetserve.v1.Worker/{method}")
            try:
                await call(payload, timeout=60)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return "OK"

    assert asyncio.run(raw("Stats", b"\xff\xff\xff\xff\x0f")) != "OK"  # not a protobuf message
    assert asyncio.run(raw("Abort", b"\x00" * (65 * 2**20))) == "RESOURCE_EXHAUSTED"  # over the 64 MiB limit
    out_of_range = pb.GenerateRequest(prompt_token_ids=[1, 2], params=TWO_TOKENS, priority=-5000)
    assert worker_code(creds, address, "Generate", out_of_range) == "INVALID_ARGUMENT"
    chunks = asyncio.run(_call(creds, address, "Generate", WORKER_RPCS["Generate"]))
    assert chunks[-1].finish_reason == "length" and chunks[-1].num_output_tokens == 2
    r = httpx.post(
        fleet.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_the_gateway_refuses_an_open_control_port_beyond_loopback():
    gateway = spawn(
        "gateway", "--port", str(free_port()), "--control-host", "0.0.0.0", "--control-port", str(free_port()),
        env={SECRET_ENV: None},
    )  # fmt: skip
    assert gateway.popen.wait(60) == 2
    text = "".join(gateway.lines)
    assert "--registration-token" in text and "FLEETSERVE_REGISTRATION_TOKEN" in text


def test_registrations_are_held_to_the_worker_networks_and_learn_nothing_of_dial_errors():
    port, control = free_port(), free_port()
    gateway = spawn(
        "gateway", "--port", str(port), "--control-port", str(control), "--worker-networks", "127.0.0.0/8"
    )  # fmt: skip
    try:
        gateway.wait_for(re.compile("fleetserve gateway ready"))
        creds = FleetCredentials(FLEET_SECRET)
        outside = control_error(creds, f"127.0.0.1:{control}", "Register", info=fake_info("far", "10.9.9.9:50051"))
        assert outside is not None and outside.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "127.0.0.0/8" in outside.details() and "worker_networks" in outside.details()
        closed = free_port()  # nothing listens there: the gateway's tokenizer fetch fails
        info = fake_info("ghost", f"127.0.0.1:{closed}", model="ghost-model", fingerprint="ab" * 32)
        unreachable = control_error(creds, f"127.0.0.1:{control}", "Register", info=info)
        assert unreachable is not None and unreachable.code() == grpc.StatusCode.UNAVAILABLE
        details = unreachable.details().lower()
        assert str(closed) not in details and "refused" not in details and "connect" not in details
        assert "advertised address" in details
        gateway.wait_for(re.compile("cannot reach it at"), timeout=10)  # the details stay in the gateway's log
        assert httpx.get(f"http://127.0.0.1:{port}/admin/routing", timeout=10).json()["workers"] == []
    finally:
        gateway.stop()


def test_fleetserve_probe_asks_a_worker_with_the_secret(fleet):
    """The command a Kubernetes probe runs: 0 when the worker serves (generating a token with --generate), 2
    when the call is refused for want of the secret or nobody answers."""
    address = sorted(fleet.addresses)[0]

    def probe(*args: str, secret: str | None = FLEET_SECRET) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != SECRET_ENV} | ({SECRET_ENV: secret} if secret else {})
        command = [sys.executable, "-m", "fleetserve", "probe", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)

    alive = probe(address)
    assert alive.returncode == 0 and "alive" in alive.stdout, alive.stderr
    generated = probe(address, "--generate")
    assert generated.returncode == 0 and re.search(r"generated one token in \d+ ms", generated.stdout)
    refused = probe(address, secret=None)
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr
    nobody = probe(f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert nobody.returncode == 2 and "UNAVAILABLE" in nobody.stderr
