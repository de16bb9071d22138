"""The `fleetserve` command: one subcommand per process kind, its flags generated from that kind's settings."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import NoReturn

from fleetserve import __version__
from fleetserve.errors import FleetServeError
from fleetserve.settings.base import Settings, add_flags, config_path, flags_of
from fleetserve.settings.embed import EmbedSettings
from fleetserve.settings.gateway import GatewaySettings
from fleetserve.settings.generate import GenerateSettings
from fleetserve.settings.node import NodeSettings
from fleetserve.settings.up import UpSettings
from fleetserve.settings.worker import WorkerSettings
from fleetserve.supervisor.parent_death import honour_parent_death
from fleetserve.telemetry.logs import configure_logging


def cmd_generate(settings: GenerateSettings, args: argparse.Namespace) -> int:
    """Generate text for one prompt with an in-process engine (or a gateway's), streaming it to the terminal."""
    from fleetserve.generate import run_generate

    return exit_without_teardown(run_generate(settings, args.prompt))


def cmd_embed(settings: EmbedSettings, args: argparse.Namespace) -> int:
    """Embed texts with an in-process embedding model (or a gateway's) and print vectors or similarities."""
    from fleetserve.embed import run_embed

    return exit_without_teardown(run_embed(settings, args.texts))


def cmd_models(settings: None, args: argparse.Namespace) -> int:
    """List the models fleetserve knows by name."""
    from fleetserve.model_files import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'NAME'.ljust(width)}  INSTALLED  SOURCE")
    for r in rows:
        print(f"{r['name'].ljust(width)}  {r['installed'].ljust(9)}  {r['source']}")
    print(
        "\nAlso accepted by --model: a Hugging Face folder (config.json + *.safetensors), a .gguf file or a .zip of a folder."
    )
    return 0


def cmd_worker(settings: WorkerSettings, args: argparse.Namespace) -> int:
    """Serve one engine over gRPC and register with a gateway."""
    import asyncio

    from fleetserve.worker.main import run_worker

    return exit_without_teardown(asyncio.run(run_worker(settings)))


def exit_without_teardown(code: int) -> NoReturn:
    """End a process that has loaded torch, once it has closed what it holds: flush the output and leave.

    The interpreter's own teardown would then spend most of a second deregistering torch's operator libraries
    and freeing tensors one by one, which only delays a restart, a scale-down or the next test."""
    import logging
    import os

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def cmd_gateway(settings: GatewaySettings, args: argparse.Namespace) -> int:
    """Serve the HTTP API and the workers' control service."""
    import asyncio

    from fleetserve.gateway.main import run_gateway

    return asyncio.run(run_gateway(settings))


def cmd_node(settings: NodeSettings, args: argparse.Namespace) -> int:
    """Run the workers the gateway places on this machine."""
    import asyncio

    from fleetserve.worker.node import run_node

    return asyncio.run(run_node(settings))


def cmd_up(settings: UpSettings, args: argparse.Namespace) -> int:
    """A gateway and local workers on one machine."""
    from fleetserve.up import run_up

    return run_up(settings, explicit_settings(UpSettings, args), config_path(args.config))


def cmd_bench(rest: list[str]) -> int:
    """`bench --engine ...`: the in-process engine benchmark; `bench ...`: the HTTP load generator."""
    if "--engine" in rest:
        from fleetserve.bench import engine_bench

        return engine_bench.main([a for a in rest if a != "--engine"])
    from fleetserve.bench import http_bench

    return http_bench.main(["--help"] if "--help-http" in rest else rest)


def explicit_settings(settings_cls: type[Settings], args: argparse.Namespace) -> set[str]:
    """The settings given to this command on purpose (``Settings.given``), from its parsed arguments."""
    return settings_cls.given(flags_of(args, settings_cls), config_path(args.config))


# subcommand -> (settings class or None, handler, help)
COMMANDS = {
    "generate": (GenerateSettings, cmd_generate, "generate text from a prompt with an in-process engine"),
    "embed": (
        EmbedSettings,
        cmd_embed,
        "texts to vectors (or their cosine similarities) with an in-process embedding model",
    ),
    "models": (None, cmd_models, "list the models fleetserve can load by name"),
    "worker": (WorkerSettings, cmd_worker, "serve one engine over gRPC and register with a gateway"),
    "gateway": (GatewaySettings, cmd_gateway, "serve the OpenAI-compatible HTTP API over registered workers"),
    "up": (UpSettings, cmd_up, "a gateway plus local workers on the default model, in one command"),
    "node": (NodeSettings, cmd_node, "a node agent: runs and restarts the workers the gateway places on this machine"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetserve", description="A distributed LLM serving engine.")
    parser.add_argument("--version", action="version", version=f"fleetserve {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR (default: WARNING)")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text or one JSON object each; both carry the request id (default: text)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (settings_cls, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "generate":
            p.add_argument("prompt", help="the prompt (a user message; '-' reads standard input)")
        if name == "embed":
            p.add_argument("texts", nargs="+", help="the texts to embed ('-' reads one per line of standard input)")
        if name == "models":
            p.add_argument("--json", action="store_true", help="print JSON")
            continue
        add_flags(p, settings_cls)
        p.add_argument(
            "--config",
            default=None,
            help="YAML file of settings (top-level keys, or under a section named after the command); "
            "FLEETSERVE_* variables and flags override it (default: $FLEETSERVE_CONFIG)",
        )
    from fleetserve import nodes_cli

    nodes = sub.add_parser("nodes", help="list the workers, join a local one, drain or stop one (the admin API)")
    nodes_cli.add_arguments(nodes)
    from fleetserve import certs

    certs.add_arguments(sub.add_parser("certs", help="make a fleet's CA and certificates for mutual TLS"))
    from fleetserve import probe

    probe.add_arguments(
        sub.add_parser(
            "probe",
            help="ask a worker whether it serves (a liveness or readiness check; exit code 0 when it does)",
            description=probe.DESCRIPTION,
        )
    )
    sub.add_parser(
        "bench",
        help="benchmarks (see docs/benchmarks.md)",
        description="fleetserve bench [OPTIONS]: the HTTP load generator against a gateway "
        "(fleetserve bench --help-http lists its options); fleetserve bench --engine [OPTIONS]: the in-process "
        "engine benchmark (fleetserve bench --engine --help).",
    )
    return parser


def load_settings(args: argparse.Namespace) -> Settings | None:
    """The command's settings from its typed flags, FLEETSERVE_* variables and config file."""
    settings_cls = COMMANDS[args.command][0]
    if settings_cls is None:
        return None
    return settings_cls.load(flags_of(args, settings_cls), config_path(args.config))


def main(argv: list[str] | None = None) -> int:
    honour_parent_death()  # a supervisor that started this process may ask to take it along when it dies
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmarks parse their own options
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        if args.command == "nodes":
            from fleetserve import nodes_cli

            return nodes_cli.run(args)
        if args.command == "certs":
            from fleetserve import certs

            return certs.run(args)
        if args.command == "probe":
            from fleetserve import probe

            return probe.run(args)
        return COMMANDS[args.command][1](load_settings(args), args)
    except FleetServeError as exc:
        print(f"fleetserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
