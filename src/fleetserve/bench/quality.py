"""How faithful each weight format is: perplexity on a held-out text, and greedy agreement with float32.

Every format runs through the engine itself (``LLMEngine`` with ``--dtype`` set), so what is measured is what
serves. Perplexity: the text is tokenized and cut into windows of ``--window`` tokens, each scored as one prefill
(every token but a window's first is predicted from the ones before it in its window); the figure is exp of the
mean negative log-likelihood over all predicted tokens. Greedy agreement: ``--prompts`` chats, ``--max-tokens``
tokens each, greedy and ignoring EOS; per prompt, the tokens before the first one that differs from float32's.

Run it as ``python benchmarks/quality.py``; the result goes to ``benchmarks/results/quality.json``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleetserve.bench.arguments import positive_int
from fleetserve.bench.results import cpu_description, created_now, host_environment, package_version, write_json
from fleetserve.bench.workload import DATA_DIR, DEFAULT_MODEL, REPO_ROOT, RESULTS_DIR, load_prompts, take

DEFAULT_TEXT = DATA_DIR / "heldout.txt"
DEFAULT_OUTPUT = RESULTS_DIR / "quality.json"
FORMATS = ["float32", "bfloat16", "int4"]
WORSE_LIMIT = 0.01
"""A format whose perplexity is more than this fraction above float32's is not one ``--dtype auto`` may pick."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help=f"comma-separated --dtype values (default {','.join(FORMATS)})"
    )
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help=f"held-out text (default {DEFAULT_TEXT})")
    parser.add_argument("--window", type=positive_int, default=512, help="tokens per scored window (default 512)")
    parser.add_argument("--prompts", type=positive_int, default=8, help="greedy prompts (default 8)")
    parser.add_argument("--max-tokens", type=positive_int, default=64, help="greedy tokens per prompt (default 64)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON result (default {DEFAULT_OUTPUT})")


def _engine(model: str, dtype: str, threads: int | None, window: int):
    from fleetserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from fleetserve.engine.engine import LLMEngine

    config = EngineConfig(
        model=ModelConfig(model=model, dtype=dtype, num_threads=threads, compile=False),  # the format's quality alone
        cache=CacheConfig(kv_cache_bytes=256 * 2**20, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=max(512, window)),
    )
    return LLMEngine(config, progress=False)


def negative_log_likelihood(engine, token_ids: list[int], window: int) -> tuple[float, int]:
    """Summed NLL (nats) of the tokens of ``token_ids`` that have a predecessor in their window, and their count.

    Each window runs as one prefill in blocks taken from the engine's KV cache and given back after (never keyed
    for prefix reuse); the engine must have room for a window and not be stepping meanwhile."""
    import torch

    from fleetserve.engine.attention import build_attention_batch

    runner = engine.runner
    model = runner.model
    total, count = 0.0, 0
    with torch.inference_mode():
        for first in range(0, len(token_ids) - 1, window):
            ids = token_ids[first : first + window]
            if len(ids) < 2:
                break
            owner = f"perplexity-{first}"
            if not engine.kv.allocate(owner, len(ids)):
                raise ValueError(f"the KV cache has no room for a window of {len(ids)} tokens")
            try:
                table = engine.kv.block_table(owner)
                batch = build_attention_batch([0], [len(ids)], [table], runner.block_size, runner.device)
                hidden = model(torch.tensor(ids), torch.arange(len(ids)), runner.kv_caches, batch)
                logits = model.compute_logits(hidden[:-1]).float()
                nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")
            finally:
                engine.kv.free(owner)
            total += float(nll)
            count += len(ids) - 1
    return total, count


def agreement(reference: list[list[int]], outputs: list[list[int]]) -> dict[str, Any]:
    """Per prompt, the tokens before the first one that differs; identical prompts; the mean share of positions
    that agree before the first divergence."""
    prefix = []
    for ref, out in zip(reference, outputs, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(ref, out, strict=False)) if a != b), min(len(ref), len(out)))
        prefix.append(n)
    lengths = [len(r) for r in reference]
    return {
        "tokens_before_divergence": prefix,
        "identical": sum(p == n for p, n in zip(prefix, lengths, strict=True)),
        "prompts": len(reference),
        "mean_share_before_divergence": sum(p / n for p, n in zip(prefix, lengths, strict=True)) / len(reference),
    }


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (results stay the same on every checkout)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import gc

    import torch

    from fleetserve.contract import SamplingParams
    from fleetserve.text.tokenizer import Tokenizer

    text = Path(args.text).read_text(encoding="utf-8")
    messages = take(load_prompts(DATA_DIR / "prompts.jsonl"), args.prompts)
    rows: list[dict[str, Any]] = []
    reference: list[list[int]] | None = None
    token_ids: list[int] = []
    for fmt in args.formats.split(","):
        started = time.monotonic()
        engine = _engine(args.model, fmt, args.threads, args.window)
        build_s = time.monotonic() - started
        tokenizer = Tokenizer.from_dir(engine.model_dir)
        token_ids = tokenizer.encode(text)
        prompts = [tokenizer.encode_chat(m) for m in messages]
        print(f"{fmt}: perplexity over {len(token_ids)} tokens ...", flush=True)
        started = time.monotonic()
        nll, count = negative_log_likelihood(engine, token_ids, args.window)
        score_s = time.monotonic() - started
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        outputs = engine.generate(prompts, params)
        reference = reference if reference is not None else outputs
        row = {
            "format": fmt,
            "weights": engine.runner.weight_format.name,
            "activations": str(engine.runner.dtype).removeprefix("torch."),
            "perplexity": math.exp(nll / count),
            "scored_tokens": count,
            "greedy": agreement(reference, outputs),
            "build_s": build_s,
            "score_s": score_s,
        }
        rows.append(row)
        print(
            f"  perplexity {row['perplexity']:.3f}, greedy identical {row['greedy']['identical']}/{len(prompts)}, "
            f"tokens before divergence {row['greedy']['tokens_before_divergence']}",
            flush=True,
        )
        del engine
        gc.collect()
    base = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_vs_first"] = row["perplexity"] / base
        row["within_limit"] = row["perplexity"] <= base * (1 + WORSE_LIMIT)
    result = {
        "benchmark": "quality",
        "created": created_now(),
        "settings": {
            "model": args.model,
            "text": _shown(Path(args.text)),
            "text_tokens": len(token_ids),
            "window": args.window,
            "prompts": args.prompts,
            "max_tokens": args.max_tokens,
            "worse_limit": WORSE_LIMIT,
        },
        "environment": host_environment(
            cpu=cpu_description(),
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            transformers=package_version("transformers"),
        ),
        "rows": rows,
    }
    write_json(Path(args.output), result)
    print()
    print(f"{'format':<10} {'perplexity':>10} {'vs ' + rows[0]['format']:>12} {'greedy identical':>17}")
    for row in rows:
        g = row["greedy"]
        print(
            f"{row['format']:<10} {row['perplexity']:>10.3f} {row['perplexity_vs_first']:>12.4f} "
            f"{g['identical']:>9}/{g['prompts']:<7}"
        )
    print(f"results: {args.output}", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/quality.py",
        description="fleetserve weight formats: perplexity on a held-out text and greedy agreement with float32.",
    )
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
