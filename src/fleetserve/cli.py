"""The `fleetserve` command: generate, models, bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

from fleetserve import __version__
from fleetserve.errors import FleetServeError
from fleetserve.telemetry.logs import configure_logging


def _engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2-135m-instruct", help="model name, Hugging Face folder or .gguf file")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (auto: float32 on CPU)")
    g.add_argument("--kv-cache-mb", type=int, default=512, help="memory for KV blocks in MiB (default: 512)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt prefixes")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences running at once (default: 64)")
    g.add_argument(
        "--max-num-batched-tokens", type=int, default=512, help="token budget of one engine step (default: 512)"
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _config_option(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument(
        "--config", default=None, help=f"YAML file of options; FLEETSERVE_* variables and flags override it{extra}"
    )


def engine_config_from_args(args: argparse.Namespace):
    """EngineConfig from the engine options above."""
    from fleetserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    return EngineConfig(
        model=ModelConfig(model=args.model, device=args.device, dtype=args.dtype, num_threads=args.threads),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_bytes=args.kv_cache_mb * 2**20,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs),
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text for one prompt with an in-process engine, streaming it to the terminal."""
    from fleetserve.contract import SamplingParams
    from fleetserve.engine.engine import LLMEngine
    from fleetserve.text.detokenizer import IncrementalDetokenizer
    from fleetserve.text.tokenizer import Tokenizer

    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    if args.url:
        return _generate_remote(args, prompt)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    ).validate()
    engine = LLMEngine(engine_config_from_args(args), progress=True)
    tokenizer = Tokenizer.from_dir(engine.model_dir)
    if args.raw:
        ids = tokenizer.encode(prompt)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        ids = tokenizer.encode_chat(messages + [{"role": "user", "content": prompt}])
    detok = IncrementalDetokenizer(tokenizer, ids)
    start = time.monotonic()
    engine.add_request(ids, params)
    first = None
    n = 0
    finish = None
    while engine.has_unfinished():
        for out in engine.step():
            first = first or time.monotonic()
            n = out.num_output_tokens
            finish = out.finish_reason
            sys.stdout.write(detok.add(out.new_token_ids))
            sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    elapsed = time.monotonic() - start
    if not args.quiet:
        decode = (n - 1) / (elapsed - (first - start)) if n > 1 and first else 0.0
        print(
            f"[{n} tokens, finish: {finish}, first token {1000 * ((first or start) - start):.0f} ms, "
            f"{decode:.1f} tokens/s after it, {len(ids)} prompt tokens]",
            file=sys.stderr,
        )
    return 0


def _generate_remote(args: argparse.Namespace, prompt: str) -> int:
    """Stream a chat completion from a gateway's OpenAI API and print it as it arrives."""
    import urllib.error
    import urllib.request

    from fleetserve.errors import InvalidRequestError

    messages = [{"role": "system", "content": args.system}] if args.system else []
    body = {
        "model": args.model,
        "messages": messages + [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.top_k:
        body["top_k"] = args.top_k
    if args.seed is not None:
        body["seed"] = args.seed
    if args.ignore_eos:
        body["ignore_eos"] = True
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    url = args.url.rstrip("/") + "/v1/chat/completions"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    start = time.monotonic()
    first = None
    usage, finish = None, None
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        first = first or time.monotonic()
                        sys.stdout.write(text)
                        sys.stdout.flush()
                    finish = choice.get("finish_reason") or finish
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):  # not an OpenAI error body: show it raw
            detail = json.loads(detail)["error"]["message"]
        raise InvalidRequestError(f"the gateway answered {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise InvalidRequestError(f"cannot reach {args.url}: {exc.reason}") from None
    sys.stdout.write("\n")
    if not args.quiet and usage:
        print(
            f"[{usage['completion_tokens']} tokens, finish: {finish}, first token "
            f"{1000 * ((first or start) - start):.0f} ms, {usage['prompt_tokens']} prompt tokens]",
            file=sys.stderr,
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
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
    print("\nAlso accepted by --model: a Hugging Face folder (config.json + *.safetensors) or a .gguf file.")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Serve one engine over gRPC and register with a gateway."""
    import asyncio

    from fleetserve.worker.main import WorkerOptions, run_worker

    opts = WorkerOptions(
        engine=engine_config_from_args(args),
        host=args.host,
        port=args.port,
        advertise=args.advertise,
        gateway=args.gateway,
        token=args.registration_token or "",
        name=args.name,
        metrics_port=args.metrics_port,
    )
    return asyncio.run(run_worker(opts))


def _api_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key or [])
    if args.api_keys_file:
        with open(args.api_keys_file) as f:
            keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return keys


def cmd_gateway(args: argparse.Namespace) -> int:
    """Serve the HTTP API and the workers' control service."""
    import asyncio

    from fleetserve.gateway.main import GatewayOptions, run_gateway

    opts = GatewayOptions(
        host=args.host,
        port=args.port,
        control_host=args.control_host,
        control_port=args.control_port,
        api_keys=_api_keys(args),
        registration_token=args.registration_token or "",
        heartbeat_timeout_s=args.heartbeat_timeout,
        preprocess_workers=args.preprocess_workers,
        default_max_tokens=args.default_max_tokens,
        policy=_checked_policy(args.policy),
        models=_model_registry(args.models),
        state_db=args.state_db or "",
        failure_threshold=args.failure_threshold,
        max_retries=args.max_retries,
        max_queue=args.max_queue,
        queue_timeout_s=args.queue_timeout,
        output_reserve_tokens=args.output_reserve_tokens,
        slow_client_timeout_s=args.slow_client_timeout,
        stream_buffer_bytes=args.stream_buffer_kb * 1024,
        response_cache=args.response_cache or "",
        response_cache_entries=args.response_cache_entries,
        response_cache_mb=args.response_cache_mb,
        response_cache_ttl_s=args.response_cache_ttl,
        telemetry=not args.no_telemetry,
        otlp_endpoint=args.otlp_endpoint or "",
        admin_key=args.admin_key or "",
    )
    return asyncio.run(run_gateway(opts))


def _checked_policy(name: str | None) -> str | None:
    from fleetserve.errors import InvalidRequestError
    from fleetserve.gateway.policies import make_policy

    if name is not None:
        try:
            make_policy(name)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), "policy") from None
    return name


def _model_registry(source):
    """The model registry from --models (a JSON or YAML file) or a config file's `models` entry."""
    from fleetserve.errors import InvalidRequestError
    from fleetserve.gateway.models import ModelRegistry
    from fleetserve.gateway.policies import make_policy

    try:
        if source is None:
            return ModelRegistry()
        registry = ModelRegistry.load(source) if isinstance(source, str) else ModelRegistry.from_config(source)
        for name in registry.names():  # a wrong policy name or option stops the gateway now, not at a request
            policy, options = registry.policy_for(name)
            try:
                make_policy(policy, **options)
            except ValueError as exc:
                raise ValueError(f"model {name!r}: {exc}") from None
        return registry
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"bad model configuration: {exc}", "models") from None


def cmd_up(args: argparse.Namespace) -> int:
    """A gateway and local workers on one machine."""
    from fleetserve.up import UpOptions, run_up

    gateway_args = [f"--api-key={k}" for k in (args.api_key or [])]
    worker_args = ["--kv-cache-mb", str(args.kv_cache_mb)]
    if args.config:
        gateway_args += ["--config", args.config]
        worker_args += ["--config", args.config]
    opts = UpOptions(
        model=args.model,
        workers=args.workers,
        host=args.host,
        port=args.port,
        control_port=args.control_port,
        threads_per_worker=args.threads,
        worker_args=worker_args,
        gateway_args=gateway_args,
    )
    return run_up(opts, api_key=(args.api_key or [None])[0])


def cmd_bench(args: argparse.Namespace) -> int:
    """`bench --engine ...`: the in-process engine benchmark; `bench ...`: the HTTP load generator."""
    rest = list(args.args)
    if "--engine" in rest:
        from fleetserve.bench import engine_bench

        return engine_bench.main([a for a in rest if a != "--engine"])
    from fleetserve.bench import http_bench

    return http_bench.main(rest)


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

    g = sub.add_parser("generate", help="generate text from a prompt with an in-process engine")
    g.add_argument("prompt", help="the prompt (a user message; '-' reads standard input)")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0: all (default: 0)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--system", default=None, help="a system message to put before the prompt")
    g.add_argument("--raw", action="store_true", help="complete the prompt as plain text, without the chat template")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--quiet", action="store_true", help="print only the generated text")
    g.add_argument("--url", default=None, help="a gateway's URL: generate there instead of in this process")
    g.add_argument("--api-key", default=None, help="bearer key for --url")
    _engine_options(g)
    _config_option(g)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list the models fleetserve can load by name")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=cmd_models)

    w = sub.add_parser("worker", help="serve one engine over gRPC and register with a gateway")
    w.add_argument("--gateway", default=None, help="the gateway's control address HOST:PORT (none: standalone)")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    w.add_argument("--port", type=int, default=0, help="gRPC port (default: 0, a free one)")
    w.add_argument("--advertise", default=None, help="HOST:PORT the gateway should dial (default: host:port)")
    w.add_argument("--name", default=None, help="worker name (default: hostname-port)")
    w.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on this HTTP port at /metrics (0: a free one; default: none)",
    )
    w.add_argument("--registration-token", default=None, help="the gateway's shared registration secret")
    _engine_options(w)
    _config_option(w)
    w.set_defaults(func=cmd_worker)

    gw = sub.add_parser("gateway", help="serve the OpenAI-compatible HTTP API over registered workers")
    gw.add_argument("--host", default="127.0.0.1", help="HTTP address (default: 127.0.0.1)")
    gw.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    gw.add_argument("--control-host", default="127.0.0.1", help="address workers register at (default: 127.0.0.1)")
    gw.add_argument("--control-port", type=int, default=50050, help="gRPC control port (default: 50050)")
    gw.add_argument("--api-key", action="append", help="require this bearer key on every route but /health")
    gw.add_argument("--api-keys-file", default=None, help="a file of accepted API keys, one a line")
    gw.add_argument("--registration-token", default=None, help="workers must present this secret to register")
    gw.add_argument("--admin-key", default=None, help="bearer key the /admin API needs (default: the API keys' rule)")
    gw.add_argument("--heartbeat-timeout", type=float, default=5.0, help="seconds of silence before a worker is dead")
    gw.add_argument(
        "--preprocess-workers",
        type=int,
        default=0,
        help="processes for chat templating and tokenization (default: 0, on the event loop)",
    )
    gw.add_argument(
        "--default-max-tokens",
        type=int,
        default=1024,
        help="max_tokens of a request that gives none, capped by the context window (default: 1024)",
    )
    r = gw.add_argument_group("routing and failure handling")
    r.add_argument(
        "--policy",
        default=None,
        help="balancing policy for models the model config gives none: round-robin, random, least-connections, "
        "least-latency, weighted, kv-aware, prefix-aware, power-of-two or consistent-hash (default: prefix-aware)",
    )
    r.add_argument("--models", default=None, help="model registry file (JSON or YAML; model_configs.json works)")
    r.add_argument("--state-db", default=None, help="SQLite file that keeps known workers and models across restarts")
    r.add_argument(
        "--failure-threshold",
        type=int,
        default=3,
        help="failed requests in a row before a worker is suspect (default: 3)",
    )
    r.add_argument("--max-retries", type=int, default=3, help="retries and resumes per request (default: 3)")
    r.add_argument("--max-queue", type=int, default=256, help="requests per model waiting for room (default: 256)")
    r.add_argument(
        "--queue-timeout", type=float, default=300.0, help="seconds a request may wait for room (default: 300)"
    )
    r.add_argument(
        "--output-reserve-tokens",
        type=int,
        default=256,
        help="KV tokens of output reserved per request at admission, beyond its prompt (default: 256)",
    )
    r.add_argument(
        "--slow-client-timeout",
        type=float,
        default=30.0,
        help="cut off a streaming client that reads nothing for this many seconds; 0: never (default: 30)",
    )
    r.add_argument(
        "--stream-buffer-kb",
        type=int,
        default=256,
        help="kernel send buffer per client connection in KiB, fixed; 0: the kernel's (default: 256)",
    )
    gw.add_argument(
        "--no-telemetry",
        action="store_true",
        help="record no metrics and keep no traces (to measure what they cost)",
    )
    gw.add_argument(
        "--otlp-endpoint",
        default=None,
        help="export finished request traces over OTLP/HTTP, e.g. http://collector:4318/v1/traces "
        "(pip install 'fleetserve[otel]')",
    )
    c = gw.add_argument_group("response cache (deterministic requests: temperature 0 or a seed)")
    c.add_argument(
        "--response-cache",
        default=None,
        help="memory, an SQLite file (.sqlite, .db or sqlite:///PATH; survives restarts) or redis://HOST:PORT/DB "
        "(shared by gateways); default: off",
    )
    c.add_argument("--response-cache-entries", type=int, default=10000, help="most entries kept (default: 10000)")
    c.add_argument("--response-cache-mb", type=int, default=256, help="most MiB kept (default: 256)")
    c.add_argument("--response-cache-ttl", type=float, default=0.0, help="seconds an entry lives; 0: until evicted")
    _config_option(gw)
    gw.set_defaults(func=cmd_gateway)

    n = sub.add_parser("nodes", help="list the workers, join a local one, drain or stop one (the admin API)")
    from fleetserve import nodes_cli

    nodes_cli.add_arguments(n)
    n.set_defaults(func=nodes_cli.run)

    up = sub.add_parser("up", help="a gateway plus local workers on the default model, in one command")
    up.add_argument("--model", default="smollm2-135m-instruct", help="model for every worker")
    up.add_argument("--workers", type=int, default=2, help="local workers (default: 2)")
    up.add_argument("--host", default="127.0.0.1", help="HTTP address (default: 127.0.0.1)")
    up.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    up.add_argument("--control-port", type=int, default=50050, help="gRPC control port (default: 50050)")
    up.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    up.add_argument("--kv-cache-mb", type=int, default=512, help="KV cache per worker in MiB (default: 512)")
    up.add_argument("--api-key", action="append", help="require this bearer key (see gateway --api-key)")
    _config_option(up, " (also passed to the gateway and workers)")
    up.set_defaults(func=cmd_up)

    b = sub.add_parser(
        "bench",
        help="benchmarks (see docs/benchmarks.md)",
        description="fleetserve bench [OPTIONS]: the HTTP load generator against a gateway "
        "(fleetserve bench --help-http lists its options); fleetserve bench --engine [OPTIONS]: the in-process "
        "engine benchmark (fleetserve bench --engine --help).",
        add_help=False,
    )
    b.add_argument("args", nargs=argparse.REMAINDER, help="options of the chosen benchmark")
    b.set_defaults(func=cmd_bench)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Fill options not given as flags from FLEETSERVE_* variables and the --config file (see config.py)."""
    import os

    from fleetserve.config import layered_options, load_config_file

    sub = _subparser(parser, args.command)
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "func")}
    # Which options were really typed: parse again with every default suppressed.
    saved = {d: a.default for d, a in actions.items()}
    for a in actions.values():
        a.default = argparse.SUPPRESS
    try:
        rest = argv[argv.index(args.command) + 1 :]
        typed, _ = sub.parse_known_args(rest)
    finally:
        for d, a in actions.items():
            a.default = saved[d]

    def parse(name: str, text: str):
        action = actions[name]
        if action.nargs == 0:  # store_true / store_false
            return text.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(action, argparse._AppendAction):
            return [part.strip() for part in text.split(",") if part.strip()]
        return action.type(text) if action.type else text

    file_data = load_config_file(args.config) if getattr(args, "config", None) else {}
    current = {d: getattr(args, d) for d in actions if hasattr(args, d)}
    merged = layered_options(args.command, current, set(vars(typed)), file_data, dict(os.environ), parse)
    for name, value in merged.items():
        action = actions[name]
        if isinstance(value, str) and action.type not in (None, str) and action.nargs != 0:
            value = action.type(value)
        if isinstance(action, argparse._AppendAction) and isinstance(value, str):
            value = [value]
        setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:  # the benchmarks parse their own options
        args = argparse.Namespace(command="bench", args=argv[1:], log_level="WARNING", func=cmd_bench)
        if "--help-http" in argv:
            args.args = ["--help"]
        return cmd_bench(args)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        args = apply_config(parser, args, argv)
        return args.func(args)
    except FleetServeError as exc:
        print(f"fleetserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
