"""The launcher's join: which worker command a replica, a prefill or decode worker and a stage node get, and what it
refuses (no processes)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from fleetserve.errors import InvalidRequestError
from fleetserve.gateway import launcher
from fleetserve.gateway.api.admin import _join_request
from fleetserve.gateway.launcher import Launcher, MemoryPlan


class FakeSupervisor:
    """Records the specs it is asked to start."""

    def __init__(self) -> None:
        self.specs = []

    def start(self, spec):
        self.specs.append(spec)
        return SimpleNamespace(pid=4242, popen=None)

    def __contains__(self, name) -> bool:
        return any(s.name == name for s in self.specs)


@pytest.fixture
def joined(monkeypatch):
    monkeypatch.setattr(launcher, "memory_plan", lambda model, device: MemoryPlan(514, 2 * 30 * 192 * 4, 90))
    local = Launcher("127.0.0.1:50050", threads=2)
    local.supervisor = FakeSupervisor()
    return local


def argument(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_a_stage_node_gets_its_role_and_whole_cap(joined):
    worker = asyncio.run(joined.join("m", "cpu", 200, role="stage"))
    argv = joined.supervisor.specs[0].argv
    assert argument(argv, "--role") == "stage" and argument(argv, "--max-memory-mb") == "200"
    assert "--kv-cache-mb" not in argv and argument(argv, "--gateway") == "127.0.0.1:50050"
    assert (worker.role, worker.max_memory_mb, worker.kv_cache_mb) == ("stage", 200, 0)
    default = asyncio.run(joined.join("m", "cpu", role="stage"))
    assert default.max_memory_mb == 514 + 90  # the weights plus KV for MIN_KV_TOKENS


def test_a_replica_keeps_its_kv_split_and_other_roles_are_refused(joined):
    worker = asyncio.run(joined.join("m", "cpu", 1000))
    argv = joined.supervisor.specs[0].argv
    assert "--role" not in argv and argument(argv, "--kv-cache-mb") == str(1000 - 514 - 256) == str(worker.kv_cache_mb)
    with pytest.raises(InvalidRequestError, match="role 'router' cannot be launched here; use one of: replica, "):
        asyncio.run(joined.join("m", "cpu", 1000, role="router"))
    assert len(joined.supervisor.specs) == 1  # nothing started for it


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_prefill_and_decode_workers_are_planned_like_replicas_with_their_role(joined, role):
    worker = asyncio.run(joined.join("m", "cpu", 1000, role=role))
    argv = joined.supervisor.specs[0].argv
    assert argument(argv, "--role") == role and argument(argv, "--kv-cache-mb") == str(1000 - 514 - 256)
    assert "--max-memory-mb" not in argv and (worker.role, worker.kv_cache_mb) == (role, 1000 - 514 - 256)
    with pytest.raises(InvalidRequestError, match="max_memory_mb 500 is too small"):
        asyncio.run(joined.join("m", "cpu", 500, role=role))  # the same floor as a replica's


@pytest.mark.parametrize("role", ["replica", "prefill", "decode", "stage"])
def test_the_admin_join_body_takes_every_launchable_role(role):
    assert _join_request({"model": "m", "role": role}) == ("m", "cpu", None, role)


@pytest.mark.parametrize("role", ["router", 7, ["decode"]])
def test_the_admin_join_body_refuses_other_roles_by_name(role):
    with pytest.raises(InvalidRequestError, match="'role' must be one of: replica, prefill, decode, stage") as info:
        _join_request({"model": "m", "role": role})
    assert info.value.param == "role"
