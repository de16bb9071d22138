"""Option layering: defaults < config file (top level, then the command's section) < FLEETSERVE_* < flags."""

import pytest

from fleetserve.cli import apply_config, build_parser
from fleetserve.errors import InvalidRequestError


def parse(argv, monkeypatch=None, env=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    return apply_config(parser, args, argv)


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text("kv_cache_mb: 100\nport: 9001\ngateway:\n  port: 9002\n  api_key: [k1, k2]\n")
    args = parse(["gateway", "--config", str(cfg)])
    assert args.port == 9002 and args.api_key == ["k1", "k2"]  # the section beats the top level
    args = parse(["worker", "--config", str(cfg)])
    assert args.kv_cache_mb == 100 and args.port == 9001  # top-level keys reach every command with the option
    monkeypatch.setenv("FLEETSERVE_PORT", "9003")
    assert parse(["gateway", "--config", str(cfg)]).port == 9003  # environment beats the file
    assert parse(["gateway", "--config", str(cfg), "--port", "8000"]).port == 8000  # a typed flag beats all,
    # even when it equals the default


def test_types_from_environment(monkeypatch):
    monkeypatch.setenv("FLEETSERVE_TEMPERATURE", "0.5")
    monkeypatch.setenv("FLEETSERVE_NO_PREFIX_CACHING", "true")
    monkeypatch.setenv("FLEETSERVE_API_KEY", "a,b")
    args = parse(["generate", "hi"])
    assert args.temperature == 0.5 and args.no_prefix_caching is True
    assert parse(["gateway"]).api_key == ["a", "b"]


def test_defaults_without_config():
    args = parse(["up"])
    assert args.workers == 2 and args.port == 8000 and args.config is None


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway:\n  prot: 1\n")
    with pytest.raises(InvalidRequestError, match="unknown option.*prot.*valid:.*port"):
        parse(["gateway", "--config", str(bad)])
    bad.write_text("- a list\n")
    with pytest.raises(InvalidRequestError, match="mapping"):
        parse(["gateway", "--config", str(bad)])
    with pytest.raises(InvalidRequestError, match="cannot read"):
        parse(["gateway", "--config", str(tmp_path / "missing.yaml")])


def test_demo_config_is_valid():
    from pathlib import Path

    demo = Path(__file__).resolve().parents[2] / "examples" / "demo_config.yaml"
    args = parse(["up", "--config", str(demo)])
    assert args.workers == 2 and args.kv_cache_mb == 256
    gateway = parse(["gateway", "--config", str(demo)])
    assert gateway.heartbeat_timeout == 5.0 and gateway.max_queue == 256

    from fleetserve.cli import _model_registry

    spec = _model_registry(gateway.models).get("smollm2-135m-instruct")
    assert spec.temperature == 0.7 and spec.max_tokens == 512 and spec.policy == "prefix-aware"
