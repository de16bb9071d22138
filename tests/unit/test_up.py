"""`fleetserve up`'s local workers: how many of each kind, their names, roles, threads and certificates (no
processes), and what its keeper reports (a tiny child process, no model)."""

from __future__ import annotations

import io
import re
import sys
import time

import pytest

from fleetserve.cli import build_parser, explicit_settings, load_settings
from fleetserve.errors import InvalidRequestError
from fleetserve.settings.up import UpSettings
from fleetserve.settings.worker import WorkerSettings
from fleetserve.supervisor import ChildSpec, KeeperEvent, Supervisor
from fleetserve.up import RESTART_POLICY, child_specs, event_message, fleet_keeper, local_counts


def up(*argv: str):
    """The settings `fleetserve up ARGV` gets and the ones it was given explicitly."""
    args = build_parser().parse_args(["up", *argv])
    return load_settings(args), explicit_settings(UpSettings, args)


def argument(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def workers(*argv: str) -> dict[str, list[str]]:
    """The worker children's argv by name, in the order they start."""
    settings, explicit = up(*argv)
    specs = child_specs(settings, explicit)
    assert specs[0].name == "gateway"
    return {s.name: s.argv for s in specs[1:]}


@pytest.mark.parametrize(
    ("argv", "counts"),
    [
        ((), (1, 0, 0, 0)),
        (("--pipeline", "3"), (0, 0, 0, 3)),
        (("--pipeline", "3", "--workers", "1"), (1, 0, 0, 3)),
        (("--prefill", "1", "--decode", "1"), (0, 1, 1, 0)),
        (("--prefill", "2", "--decode", "1", "--workers", "1"), (1, 2, 1, 0)),
        (("--decode", "1"), (0, 0, 1, 0)),
    ],
)
def test_local_counts_start_replicas_beside_other_kinds_only_when_asked(argv, counts, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    settings, explicit = up(*argv)
    found = local_counts(settings, explicit)
    assert (found.replicas, found.prefill, found.decode, found.stages) == counts


def test_prefill_and_decode_workers_get_their_role_name_and_a_share_of_the_threads(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 12)
    specs = workers("--prefill", "2", "--decode", "1", "--workers", "1")
    assert list(specs) == ["worker-0", "prefill-0", "prefill-1", "decode-0"]
    assert "--role" not in specs["worker-0"]
    assert [argument(specs[n], "--role") for n in ("prefill-0", "prefill-1", "decode-0")] == ["prefill"] * 2 + [
        "decode"
    ]
    assert {argument(a, "--threads") for a in specs.values()} == {"3"}  # 12 cores over 4 workers
    assert all(argument(a, "--name") == name for name, a in specs.items())


def test_every_kind_together_splits_the_threads_and_gets_its_own_certificate(monkeypatch, tmp_path):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    settings, explicit = up("--workers", "1", "--prefill", "1", "--decode", "1", "--pipeline", "2")
    counts = local_counts(settings, explicit)
    assert counts.total == 5 and counts.serving == 4  # a pipeline serves through its head
    tls = {name: _Files(name) for name in ["gateway", *(f"worker-{i}" for i in range(counts.total))]}
    specs = child_specs(settings, explicit, tls=tls)
    assert [s.name for s in specs] == ["gateway", "worker-0", "prefill-0", "decode-0", "stage-0", "stage-1"]
    assert [s.env["CERT"] for s in specs] == ["gateway", *(f"worker-{i}" for i in range(5))]
    assert {argument(s.argv, "--threads") for s in specs[1:]} == {"3"}
    assert [argument(s.argv, "--role") for s in specs[1:]] == [None, "prefill", "decode", "stage", "stage"]


@pytest.mark.parametrize(
    ("argv", "summary"),
    [
        ((), "1 worker(s)"),
        (("--prefill", "1", "--decode", "1"), "1 prefill and 1 decode worker(s)"),
        (("--prefill", "1", "--decode", "1", "--workers", "2"), "2 worker(s), 1 prefill and 1 decode worker(s)"),
        (("--pipeline", "3"), "a pipeline of 3 stage node(s)"),
        (("--pipeline", "3", "--workers", "1"), "1 worker(s) and a pipeline of 3 stage node(s)"),
    ],
)
def test_the_summary_names_every_kind(argv, summary, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert local_counts(*up(*argv)).summary() == summary


def test_a_negative_count_is_refused():
    with pytest.raises(InvalidRequestError, match="prefill: Input should be greater than or equal to 0"):
        up("--prefill", "-1")


class _Files:
    """Stands in for a CertFiles: its environment names it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def env(self) -> dict[str, str]:
        return {"CERT": self.name}


def test_every_child_exits_with_up_and_is_kept_by_a_keeper_that_keeps_clean_exits_stopped():
    specs = child_specs(*up("--prefill", "1", "--decode", "1"))
    assert all(s.exit_with_parent for s in specs)
    keeper = fleet_keeper(Supervisor(), io.StringIO())
    assert keeper.policy == RESTART_POLICY and not RESTART_POLICY.restart_clean_exit


def test_what_the_keeper_does_is_printed_with_the_last_lines_of_a_crash_loop():
    crashed = KeeperEvent("worker-0", "crashed", "exited with code 3 after 2.0s; starting it again in 4s", 3)
    assert event_message(crashed) == "fleetserve up: worker-0 exited with code 3 after 2.0s; starting it again in 4s"
    detail = "exited with code 1 after 0.3s: 5 crashes within 120s, not started again"
    looping = KeeperEvent("gateway", "crash-looping", detail, 1, ["Traceback ...", "OSError: address in use"])
    assert event_message(looping).splitlines() == [
        f"fleetserve up: gateway {detail}; the others go on serving. Its last lines:",
        "  Traceback ...",
        "  OSError: address in use",
    ]


def test_the_fleet_keeper_reports_a_crashed_child_and_when_it_starts_again():
    out = io.StringIO()
    keeper = fleet_keeper(Supervisor(), out)
    keeper.keep(ChildSpec("worker-0", [sys.executable, "-c", "raise SystemExit(3)"]))
    try:
        deadline = time.monotonic() + 60
        while not keeper.tick():
            assert time.monotonic() < deadline, "the crash was not noticed"
            time.sleep(0.02)
    finally:
        keeper.close(grace_s=10)
    assert re.fullmatch(
        r"fleetserve up: worker-0 exited with code 3 after \S+s; starting it again in 1s\n", out.getvalue()
    )


def test_several_models_get_their_own_replicas_and_a_served_name():
    specs = workers("--model", "smollm2-135m-instruct", "--model", "creative=smollm2-135m-instruct", "--workers", "3")
    assert [(argument(a, "--model"), argument(a, "--served-model-name")) for a in specs.values()] == [
        ("smollm2-135m-instruct", None),
        ("smollm2-135m-instruct", "creative"),
        ("smollm2-135m-instruct", None),
    ]
    settings, explicit = up("--model", "a", "--model", "b=a")
    assert local_counts(settings, explicit).replicas == 2 and settings.served == [("a", "a"), ("b", "a")]
    assert child_specs(settings, explicit)[1].env["FLEETSERVE_MODEL"] is None  # each worker has its model in its argv


def test_embeddings_add_an_embedding_worker_beside_the_llm(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    specs = workers("--embeddings")
    assert list(specs) == ["worker-0", "embed-0"]
    assert argument(specs["embed-0"], "--model") == "all-minilm-l6-v2" and "--role" not in specs["embed-0"]
    assert argument(specs["worker-0"], "--model") == "smollm2-135m-instruct"
    assert {argument(a, "--threads") for a in specs.values()} == {"2"}  # the cores are split between the two
    settings, explicit = up("--embeddings", "--embedding-model", "/models/e5")
    counts = local_counts(settings, explicit)
    assert counts.serving == 2 and counts.summary() == "1 worker(s) and 1 embedding worker(s)"
    assert argument(child_specs(settings, explicit)[2].argv, "--model") == "/models/e5"


@pytest.mark.parametrize("models", [("a", "a"), ("x=",), ("=y",)])
def test_a_model_given_twice_or_half_named_is_refused(models):
    with pytest.raises(InvalidRequestError):
        up(*[arg for m in models for arg in ("--model", m)])


@pytest.mark.parametrize(("cores", "count", "threads"), [(2, 1, "2"), (4, 1, "4"), (16, 4, "4"), (1, 1, "1")])
def test_by_default_one_worker_per_four_cores_with_the_cores_split(cores, count, threads, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    specs = workers()
    assert len(specs) == count and {argument(a, "--threads") for a in specs.values()} == {threads}


def test_the_stream_interval_goes_to_the_workers_not_the_gateway():
    settings, explicit = up("--stream-interval", "4", "--stream-max-wait-ms", "30")
    gateway, worker = child_specs(settings, explicit)
    assert worker.env["FLEETSERVE_STREAM_INTERVAL"] == "4" and worker.env["FLEETSERVE_STREAM_MAX_WAIT_MS"] == "30.0"
    assert "FLEETSERVE_STREAM_INTERVAL" not in gateway.env or gateway.env["FLEETSERVE_STREAM_INTERVAL"] is None
    with pytest.raises(InvalidRequestError):
        up("--stream-interval", "0")
    # left unset, each worker's engine takes its device's default (groups on CPU, every token on CUDA)
    worker = child_specs(*up())[1]
    assert worker.env.get("FLEETSERVE_STREAM_INTERVAL") is None
    assert WorkerSettings().stream_options()["stream_interval"] is None
