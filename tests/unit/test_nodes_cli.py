"""`fleetserve nodes`: the join's --role choices, what a join says it started, and the role column of `list`
(the admin API stubbed: no gateway)."""

from __future__ import annotations

import pytest

from fleetserve import nodes_cli
from fleetserve.cli import build_parser
from fleetserve.errors import InvalidRequestError


def nodes(*argv: str):
    return build_parser().parse_args(["nodes", *argv])


@pytest.mark.parametrize("role", ["replica", "prefill", "decode", "stage"])
def test_join_takes_every_launchable_role(role):
    assert nodes("join", "--role", role).role == role


def test_join_refuses_other_roles_and_defaults_to_a_replica(capsys):
    assert nodes("join").role == "replica"
    with pytest.raises(SystemExit):
        nodes("join", "--role", "router")
    assert "invalid choice: 'router'" in capsys.readouterr().err


def test_a_decode_join_sends_its_role_and_says_what_it_started(monkeypatch, capsys):
    sent = []

    def call(url, method, path, admin_key, body=None):
        sent.append((method, path, body))
        return {
            "name": "local-1",
            "pid": 7,
            "model": "m",
            "device": "cpu",
            "role": "decode",
            "max_memory_mb": 1000,
            "kv_cache_mb": 230,
        }

    monkeypatch.setattr(nodes_cli, "call", call)
    assert nodes_cli.run(nodes("join", "--model", "m", "--role", "decode", "--max-memory-mb", "1000")) == 0
    assert sent == [
        ("POST", "/admin/workers", {"model": "m", "device": "cpu", "role": "decode", "max_memory_mb": 1000})
    ]
    assert capsys.readouterr().out.startswith(
        "started local-1 (pid 7): m on cpu, a decode worker, 1000 MiB cap, 230 MiB KV"
    )


def test_list_shows_each_workers_role():
    table = nodes_cli.format_table(
        [
            {"name": "p", "state": "healthy", "model": "m", "role": "prefill"},
            {"name": "d", "state": "healthy", "model": "m", "role": "decode"},
            {"name": "s", "state": "healthy", "model": "m", "role": "stage", "layer_start": 0, "layer_end": 12},
        ]
    )
    header, *rows = table.splitlines()
    assert header.split()[:4] == ["NAME", "STATE", "MODEL", "ROLE"]
    assert [r.split()[3] for r in rows] == ["prefill", "decode", "stage"] and rows[2].split()[4] == "0-12"


def test_list_says_desired_against_actual_and_names_crash_looping_workers():
    deployment = {
        "model": "m", "role": "replica", "min_replicas": 1, "max_replicas": 4,
        "status": {"desired": 3, "planned": 3, "running": 2, "serving": 2, "waiting": "",
                   "crash_looping": [{"worker": "m-1", "node": "a", "exit_code": 1, "last_lines": ["boom", "Err: no GPU"]}]},
    }  # fmt: skip
    first, second = nodes_cli.format_deployment(deployment).splitlines()
    assert first == "deployment m/replica: 3 desired (1..4), 3 placed, 2 running, 2 serving"
    assert second == "  m-1 on a is crash-looping (exit 1): Err: no GPU"
    node = {"name": "a", "state": "connected", "max_workers": 3, "workers": [{}, {}], "cpus": 4, "memory_mb": 4096,
            "free": {"memory_mb": 2000, "cpus": 2, "workers": 1}}  # fmt: skip
    assert (
        nodes_cli.format_node(node) == "node a: connected, 2 of 3 worker(s), 2000 of 4096 MiB and 2 of 4 core(s) free"
    )


def test_scale_needs_a_replica_count(capsys):
    with pytest.raises(InvalidRequestError, match="--replicas"):
        nodes_cli.run(nodes("scale", "--model", "m"))
