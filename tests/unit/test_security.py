"""The link security module: the secret interceptors on a real grpc.aio server, loopback and network rules,
certificates from `fleetserve certs init`, and the registry's session secrets and block-report cap."""

from __future__ import annotations

import asyncio
import os
import stat

import grpc
import pytest

from fleetserve.certs import init_certs
from fleetserve.errors import InvalidRequestError
from fleetserve.gateway.registry import WorkerRegistry
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import FleetCredentials, address_allowed, is_loopback, parse_networks


class Echo(pb_grpc.WorkerServicer):
    """Answers the RPC kinds the fleet uses: unary (Stats) and server streaming (Generate)."""

    async def Stats(self, request, context):
        return pb.WorkerStats(steps=7)

    async def Generate(self, request, context):
        for token in request.prompt_token_ids:
            yield pb.GenerateChunk(token_ids=[token])


async def _serve(creds: FleetCredentials):
    server = creds.server()
    pb_grpc.add_WorkerServicer_to_server(Echo(), server)
    port = creds.server_port(server, "127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _calls(server_creds: FleetCredentials, client_creds: FleetCredentials) -> tuple[str, str]:
    server, address = await _serve(server_creds)
    try:
        async with client_creds.channel(address) as channel:
            stub = pb_grpc.WorkerStub(channel)
            results = []
            for call in (
                lambda: stub.Stats(pb.StatsRequest(), timeout=5),
                lambda: _collect(stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 2]), timeout=5)),
            ):
                try:
                    await call()
                    results.append("OK")
                except grpc.aio.AioRpcError as exc:
                    results.append(exc.code().name)
            return results[0], results[1]
    finally:
        await server.stop(None)


async def _collect(call) -> list:
    return [chunk async for chunk in call]


@pytest.mark.parametrize(
    "client, expected",
    [("s3cret", ("OK", "OK")), ("", ("UNAUTHENTICATED",) * 2), ("wrong", ("UNAUTHENTICATED",) * 2)],
)
def test_the_secret_guards_unary_and_streaming_calls(client, expected):
    assert asyncio.run(_calls(FleetCredentials("s3cret"), FleetCredentials(client))) == expected


def test_no_secret_leaves_the_server_open():
    assert asyncio.run(_calls(FleetCredentials(), FleetCredentials())) == ("OK", "OK")


def test_mutual_tls_needs_a_certificate_of_the_same_ca(tmp_path):
    fleet = init_certs(tmp_path / "a", workers=1)
    other = init_certs(tmp_path / "b", workers=1)
    for path in [*(f.key for f in fleet.values()), tmp_path / "a" / "ca-key.pem"]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    gw, w0 = fleet["gateway"], fleet["worker-0"]
    server = FleetCredentials("s", str(gw.ca), str(gw.cert), str(gw.key))
    good = FleetCredentials("s", str(w0.ca), str(w0.cert), str(w0.key))
    rogue = FleetCredentials("s", str(gw.ca), str(other["worker-0"].cert), str(other["worker-0"].key))
    assert asyncio.run(_calls(server, good)) == ("OK", "OK")
    assert asyncio.run(_calls(server, rogue)) == ("UNAVAILABLE", "UNAVAILABLE")
    assert asyncio.run(_calls(server, FleetCredentials("s"))) == ("UNAVAILABLE", "UNAVAILABLE")  # plain text
    with pytest.raises(InvalidRequestError, match="tls_key"):
        FleetCredentials("s", str(gw.ca), str(gw.cert)).check()
    with pytest.raises(InvalidRequestError, match="already holds a CA"):
        init_certs(tmp_path / "a")


def test_loopback_and_worker_networks():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.0.1", "::1", "localhost", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""))
    nets = parse_networks(["10.0.0.0/8", "fd00::/8"])
    assert address_allowed("10.1.2.3:50051", nets) and address_allowed("[fd00::1]:1", nets)
    assert not address_allowed("127.0.0.1:50051", nets)
    assert not address_allowed("no-such-host.invalid:1", nets)
    assert address_allowed("anything:1", [])
    with pytest.raises(InvalidRequestError, match="worker_networks"):
        parse_networks(["10.0.0.0/33"])


def _registry() -> WorkerRegistry:
    return WorkerRegistry(connect=lambda address: (None, object()))


def test_ids_are_random_and_sessions_are_per_worker():
    reg = _registry()
    a = reg.register(pb.WorkerInfo(name="a", address="127.0.0.1:1", model="m", kv_blocks_total=4))
    b = reg.register(pb.WorkerInfo(name="b", address="127.0.0.1:2", model="m", kv_blocks_total=4))
    assert a.worker_id != b.worker_id and len(a.worker_id) > 30
    assert reg.authenticate(a.worker_id, a.session_secret)
    assert not reg.authenticate(a.worker_id, b.session_secret) and not reg.authenticate(a.worker_id, "")
    again = reg.register(pb.WorkerInfo(name="a", address="127.0.0.1:1", model="m", kv_blocks_total=4))
    assert again.worker_id == a.worker_id and again.session_secret != a.session_secret


def test_block_reports_beyond_the_kv_cache_are_dropped():
    reg = _registry()
    w = reg.register(pb.WorkerInfo(name="a", address="127.0.0.1:1", model="m", kv_blocks_total=4))
    reg.heartbeat(pb.HeartbeatReport(worker_id=w.worker_id, block_hashes=pb.BlockHashDelta(reset=True, added=[1, 2])))
    assert w.block_hashes == {1, 2}
    reg.heartbeat(pb.HeartbeatReport(worker_id=w.worker_id, block_hashes=pb.BlockHashDelta(added=range(10, 5000))))
    assert w.block_hashes == {1, 2}
    reg.heartbeat(pb.HeartbeatReport(worker_id=w.worker_id, block_hashes=pb.BlockHashDelta(added=[3, 4])))
    assert w.block_hashes == {1, 2, 3, 4}
