"""Settings: defaults < config file (top level, then the command's section) < FLEETSERVE_* < typed flags."""

from pathlib import Path

import pytest

from fleetserve.cli import build_parser, explicit_settings, load_settings
from fleetserve.config import SchedulerConfig
from fleetserve.errors import InvalidRequestError
from fleetserve.gateway.main import model_registry
from fleetserve.settings.gateway import GatewaySettings
from fleetserve.settings.up import UpSettings

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo_config.yaml"


def parse(argv):
    return load_settings(build_parser().parse_args(argv))


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text("kv_cache_mb: 100\nport: 9001\ngateway:\n  port: 9002\n  api_key: [k1, k2]\n")
    s = parse(["gateway", "--config", str(cfg)])
    assert s.port == 9002 and s.api_key == ["k1", "k2"]  # the section beats the top level
    s = parse(["worker", "--config", str(cfg)])
    assert s.kv_cache_mb == 100 and s.port == 9001  # top-level keys reach every command with the option
    monkeypatch.setenv("FLEETSERVE_PORT", "9003")
    assert parse(["gateway", "--config", str(cfg)]).port == 9003  # environment beats the file
    assert parse(["gateway", "--config", str(cfg), "--port", "8000"]).port == 8000  # a typed flag beats all,
    # even when it equals the default
    monkeypatch.setenv("FLEETSERVE_CONFIG", str(cfg))
    monkeypatch.delenv("FLEETSERVE_PORT")
    assert parse(["gateway"]).port == 9002  # the file named by FLEETSERVE_CONFIG


def test_types_from_environment(monkeypatch):
    monkeypatch.setenv("FLEETSERVE_TEMPERATURE", "0.5")
    monkeypatch.setenv("FLEETSERVE_PREFIX_CACHING", "false")
    monkeypatch.setenv("FLEETSERVE_API_KEY", "a,b")
    monkeypatch.setenv("FLEETSERVE_MODELS", '{"m": {"max_tokens": 5}}')
    s = parse(["generate", "hi"])
    assert s.temperature == 0.5 and s.prefix_caching is False
    assert s.engine_config().cache.enable_prefix_caching is False
    g = parse(["gateway"])
    assert g.api_key == ["a", "b"] and g.models == {"m": {"max_tokens": 5}}


def test_flags_of_every_kind():
    s = parse(["gateway", "--api-key", "x", "--api-key", "y", "--no-telemetry", "--queue-timeout", "2.5"])
    assert s.api_key == ["x", "y"] and s.telemetry is False and s.queue_timeout == 2.5
    w = parse(["worker", "--no-prefix-caching", "--threads", "1", "--kv-cache-mb", "64"])
    assert w.prefix_caching is False and w.threads == 1 and w.engine_config().cache.kv_cache_bytes == 64 * 2**20


def test_defaults_without_config():
    s = parse(["up"])
    assert s.workers is None and s.port == 8000 and s.model == ["smollm2-135m-instruct"]  # workers: by the cores


def test_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gateway", "--help"])
    out = capsys.readouterr().out
    for name in GatewaySettings.model_fields:
        assert "--" + name.replace("_", "-") in out, name
    assert "(default: 50050)" in out and "--no-telemetry" in out


@pytest.mark.parametrize("command", ["generate", "worker", "gateway", "up", "node", "nodes", "models"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0 and f"fleetserve {command}" in capsys.readouterr().out


def test_bad_config_files_and_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway:\n  prot: 1\n")
    with pytest.raises(InvalidRequestError, match="unknown option.*prot.*valid:.*port"):
        parse(["gateway", "--config", str(bad)])
    bad.write_text("- a list\n")
    with pytest.raises(InvalidRequestError, match="mapping"):
        parse(["gateway", "--config", str(bad)])
    with pytest.raises(InvalidRequestError, match="cannot read"):
        parse(["gateway", "--config", str(tmp_path / "missing.yaml")])
    bad.write_text("gateway:\n  port: eighty\n")
    with pytest.raises(InvalidRequestError, match="port"):
        parse(["gateway", "--config", str(bad)])
    with pytest.raises(InvalidRequestError, match="dtype must be"):
        parse(["worker", "--dtype", "float8"])


def test_bad_policy_stops_the_gateway():
    with pytest.raises(InvalidRequestError, match="policy"):
        model_registry(GatewaySettings.load({"policy": "fastest"}))
    with pytest.raises(InvalidRequestError, match="bad model configuration"):
        model_registry(GatewaySettings.load({"models": {"m": {"policy": "nope"}}}))


def test_demo_config_is_valid():
    up = parse(["up", "--config", str(DEMO)])
    assert up.workers == 2 and up.kv_cache_mb == 256
    gateway = parse(["gateway", "--config", str(DEMO)])
    assert gateway.heartbeat_timeout == 5.0 and gateway.max_queue == 256
    spec = model_registry(gateway).get("smollm2-135m-instruct")
    assert spec.temperature == 0.7 and spec.max_tokens == 512 and spec.policy == "prefix-aware"


def test_up_hands_its_settings_to_the_gateway_and_workers(tmp_path, monkeypatch):
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text("kv_cache_mb: 100\nup:\n  port: 9100\n")
    monkeypatch.setenv("FLEETSERVE_MAX_QUEUE", "5")
    args = build_parser().parse_args(
        ["up", "--config", str(cfg), "--policy", "round-robin", "--admin-key", "k", "--max-num-seqs", "8"]
    )
    up = load_settings(args)
    explicit = explicit_settings(UpSettings, args)
    assert explicit == {"port", "policy", "admin_key", "max_num_seqs", "max_queue"}
    gateway = up.gateway_env(explicit)
    assert gateway == {
        "FLEETSERVE_PORT": "9100",
        "FLEETSERVE_POLICY": "round-robin",
        "FLEETSERVE_ADMIN_KEY": "k",
        "FLEETSERVE_MAX_QUEUE": "5",
    }
    assert up.worker_env(explicit) == {"FLEETSERVE_MAX_NUM_SEQS": "8"}  # kv_cache_mb comes from the file itself


def test_small_steps_use_every_thread_unless_told(monkeypatch):
    from fleetserve.settings.worker import WorkerSettings

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    for flags in ({}, {"threads": 4}):
        assert WorkerSettings.load(flags).engine_config().model.small_step_threads is None
    assert WorkerSettings.load({"threads": 4, "small_step_threads": 3}).engine_config().model.small_step_threads == 3


def test_the_step_budget_defaults_by_device_and_never_below_the_sequences():
    assert SchedulerConfig().token_budget("cpu") == 128
    assert SchedulerConfig(max_num_seqs=200).token_budget("cpu") == 200
    assert SchedulerConfig().token_budget("cuda") == 512
    assert SchedulerConfig(max_num_batched_tokens=48).token_budget("cpu") == 48
    with pytest.raises(InvalidRequestError):
        SchedulerConfig(max_num_batched_tokens=0).validate()
