"""Heartbeats through a relay (``worker.heartbeat_relay``), as the workers behind a node agent send them: a real
gateway in its own process; the relay and stand-in workers (tests/stub_worker.py) in this one, over real gRPC
with the fleet secret. Relayed workers stay healthy past the heartbeat timeout while their reports go up
together; a command reaches the worker it names through the relay; a report with a wrong session secret ends
only its own worker's stream; when the relay loses its gateway, its workers register again once it is back."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import httpx
import pytest

from fleetserve.protocol.security import FleetCredentials
from fleetserve.worker.heartbeat_relay import HeartbeatRelay, serve_relay
from tests.fleet import FLEET_SECRET, free_port, spawn
from tests.stub_worker import start_stub_worker

pytestmark = pytest.mark.slow

INTERVAL_S = 0.3
TIMEOUT_S = 1.5
LIMIT_S = 180  # a test that hangs fails instead


def start_gateway(port: int, control: int):
    proc = spawn(
        "gateway", "--port", str(port), "--control-port", str(control),
        "--heartbeat-interval", str(INTERVAL_S), "--heartbeat-timeout", str(TIMEOUT_S),
    )  # fmt: skip
    proc.wait_for(re.compile("fleetserve gateway ready"))
    return proc


async def until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def states(client: httpx.AsyncClient, url: str, key: str = "state") -> dict[str, str]:
    body = (await client.get(url + "/admin/workers")).json()
    return {w["name"]: w[key] for w in body["workers"]}


class Relayed:
    """A relay on a free port, ``count`` stub workers heartbeating through it and one heartbeating directly."""

    def __init__(self, control: str, count: int):
        self.control = control
        self.count = count
        self.credentials = FleetCredentials(FLEET_SECRET)
        self.relay = HeartbeatRelay(control, self.credentials, flush_s=INTERVAL_S)

    async def __aenter__(self) -> Relayed:
        self.server, port = await serve_relay(self.relay, "127.0.0.1:0")
        self.relay_task = asyncio.create_task(self.relay.run())
        self.workers = [
            await start_stub_worker(self.control, f"relayed-{i}", self.credentials, heartbeat_relay=f"127.0.0.1:{port}")
            for i in range(self.count)
        ]
        self.workers.append(await start_stub_worker(self.control, "direct", self.credentials))
        self.agents = [agent for _, agent, _ in self.workers]
        await until(lambda: all(a.registered.is_set() for a in self.agents))
        return self

    async def __aexit__(self, *exc) -> None:
        tasks = [task for _, _, task in self.workers] + [self.relay_task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        closing = [agent.close() for _, agent, _ in self.workers]
        closing += [server.stop(None) for server, _, _ in self.workers] + [self.server.stop(None)]
        await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 30)


def test_relayed_heartbeats_keep_workers_healthy_and_carry_commands(model_dir):
    port, control = free_port(), free_port()
    gateway = start_gateway(port, control)
    try:
        asyncio.run(asyncio.wait_for(relayed_fleet(f"http://127.0.0.1:{port}", f"127.0.0.1:{control}"), LIMIT_S))
    finally:
        gateway.stop()


async def relayed_fleet(url: str, control: str) -> None:
    async with Relayed(control, 3) as fleet, httpx.AsyncClient(timeout=30) as client:
        agents = fleet.agents
        await asyncio.sleep(3 * TIMEOUT_S)  # many intervals, twice the timeout and more
        relay = fleet.relay
        listed = await states(client, url)
        sent = f"the relay sent {relay.reports_sent} reports in {relay.batches_sent} batches"
        assert listed == {a.info.name: "healthy" for a in agents}, f"{listed}; {sent}"
        vias = await states(client, url, "heartbeats_via")
        assert vias == {**{a.info.name: "relay" for a in agents[:3]}, "direct": "direct"}
        assert relay.reports_sent >= 3 * 6  # every relayed worker's reports went up...
        assert relay.batches_sent * 2 <= relay.reports_sent  # ...several to a message

        # A drain asked of one relayed worker reaches it, and no other.
        reply = await client.post(url + f"/admin/workers/{agents[0].worker_id}/drain")
        assert reply.status_code == 202, reply.text
        await until(lambda: agents[0].draining)
        await asyncio.sleep(2 * INTERVAL_S)
        assert not any(a.draining for a in agents[1:])
        assert (await states(client, url))[agents[0].info.name] == "draining"

        # A report with a wrong session secret ends its own worker's stream: that worker registers again (a new
        # session secret); the others' streams and registrations go on untouched.
        sessions = [a._session for a in agents]
        agents[1]._session = "not-the-secret"
        await until(lambda: agents[1].registered.is_set() and agents[1]._session not in ("not-the-secret", sessions[1]))
        await asyncio.sleep(2 * INTERVAL_S)
        assert [a._session for a in agents[2:]] == sessions[2:]
        listed = await states(client, url)
        assert listed[agents[1].info.name] == listed[agents[2].info.name] == "healthy"


def test_workers_behind_a_relay_come_back_with_their_gateway(model_dir):
    port, control = free_port(), free_port()
    gateway = start_gateway(port, control)
    try:
        comes_back = gateway_comes_back(f"http://127.0.0.1:{port}", f"127.0.0.1:{control}", port, control, gateway)
        asyncio.run(asyncio.wait_for(comes_back, LIMIT_S))
    finally:
        gateway.stop()


async def gateway_comes_back(url: str, control_address: str, port: int, control: int, gateway) -> None:
    async with Relayed(control_address, 2) as fleet, httpx.AsyncClient(timeout=30) as client:
        await asyncio.sleep(2 * INTERVAL_S)
        gateway.stop()  # the relay's upstream stream breaks: its workers' streams end, they try to register again
        await until(lambda: not any(a.registered.is_set() for a in fleet.agents))
        restarted = await asyncio.to_thread(start_gateway, port, control)
        try:
            await until(lambda: all(a.registered.is_set() for a in fleet.agents), 30)
            await asyncio.sleep(3 * TIMEOUT_S)
            listed = await states(client, url)
            sent = f"the relay sent {fleet.relay.reports_sent} reports in {fleet.relay.batches_sent} batches"
            assert listed == {a.info.name: "healthy" for a in fleet.agents}, f"{listed}; {sent}"
        finally:
            restarted.stop()
