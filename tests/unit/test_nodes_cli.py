"""`fleetserve nodes`: the join's --role choices, what a join says it started, and the role column of `list`
(the admin API stubbed: no gateway)."""

from __future__ import annotations

import pytest

from fleetserve import nodes_cli
from fleetserve.cli import build_parser


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
