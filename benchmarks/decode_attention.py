"""Our decode-attention kernel (engine/decode_kernel.py) against the general one, alone and in a compiled step.

* **alone**: one call, 2 threads, on the paged cache layout (3 KV heads of 64, 3 query heads each, blocks of 16
  scattered over a 728-block cache): the kernel against the gather of each row's context plus
  ``scaled_dot_product_attention``, for batch x context shapes, bfloat16 and float32 caches.
* **step**: one ``LLMEngine`` (``--dtype auto``, compiled decode steps, 2 threads) decoding ``--seqs`` sequences
  with prompts of ``--prompt`` tokens: the p50 of a step's time over ``--steps`` steps, with the kernel
  (``FLEETSERVE_DECODE_KERNEL=on``) and without, each in a process of its own, alternating ``--rounds`` times.

    python benchmarks/decode_attention.py --part alone
    python benchmarks/decode_attention.py --part step --prompt 250 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, GROUP, DIM, BLOCK, BLOCKS = 3, 3, 64, 16, 728
SHAPES = [(1, 256), (1, 512), (2, 256), (4, 256), (8, 256), (16, 256)]


def gathered(q, cache, slots, mask, scale):
    rows, width = slots.shape
    ctx = cache.view(cache.shape[0], -1).index_select(0, slots.view(-1)).view(rows, width, 2, HEADS, DIM)
    keys, values = ctx[:, :, 0].transpose(1, 2), ctx[:, :, 1].transpose(1, 2)
    return F.scaled_dot_product_attention(q.to(ctx.dtype), keys, values, attn_mask=mask, scale=scale)


def per_call_us(fn, args, calls: int = 300) -> float:
    for _ in range(20):
        fn(*args)
    started = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - started) / calls * 1e6


def alone() -> list[dict]:
    from fleetserve.engine import decode_kernel

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as cache_dir:
        if not decode_kernel.ensure_loaded(Path(cache_dir)):
            raise SystemExit("the decode-attention kernel did not build (see the warning above)")
    kernel = torch.ops.fleetserve.decode_attention
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        cache = torch.randn(BLOCKS * BLOCK, 2, HEADS, DIM).to(dtype)
        for batch, width in SHAPES:
            tables = torch.randint(0, BLOCKS, (batch, width // BLOCK))
            slots = (tables.unsqueeze(2) * BLOCK + torch.arange(BLOCK)).reshape(batch, -1)
            lengths = torch.randint(width - BLOCK + 1, width + 1, (batch,))
            mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1))[:, None, None, :]
            q = torch.randn(batch, HEADS, GROUP, DIM).to(dtype)
            args = (q, cache, slots, mask, DIM**-0.5)
            row = {
                "cache": str(dtype).removeprefix("torch."),
                "batch": batch,
                "context": width,
                "general_us": round(per_call_us(gathered, args), 1),
                "ours_us": round(per_call_us(kernel, args), 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def step_p50_ms(seqs: int, prompt: int, steps: int) -> float:
    from fleetserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from fleetserve.contract import SamplingParams
    from fleetserve.engine.engine import LLMEngine

    torch.set_num_threads(2)
    config = EngineConfig(
        model=ModelConfig(dtype="auto", compile=True),
        cache=CacheConfig(kv_cache_bytes=128 * 2**20),
        scheduler=SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=max(512, seqs * prompt)),
    )
    engine = LLMEngine(config, progress=False)
    engine.runner.compiled.wait()
    params = SamplingParams(max_tokens=steps + 50, temperature=0.0, ignore_eos=True)
    for i in range(seqs):
        engine.add_request(list(range(100 + i, 100 + i + prompt)), params, request_id=f"r{i}")
    times = []
    for _ in range(steps + 10):
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    decodes = sorted(times[10:])  # after the prefill
    return decodes[len(decodes) // 2] * 1e3


def step(args: argparse.Namespace) -> list[dict]:
    rows = []
    for _ in range(args.rounds):
        for kernel in ("on", "off"):
            env = {**os.environ, "FLEETSERVE_DECODE_KERNEL": kernel}
            argv = [sys.executable, __file__, "--one-step", str(args.seqs), str(args.prompt), str(args.steps)]
            out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.split()
            row = {"kernel": kernel, "seqs": args.seqs, "prompt": args.prompt, "step_p50_ms": round(float(out[-1]), 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("alone", "step", "both"), default="both")
    parser.add_argument("--seqs", type=int, default=1, help="sequences decoding together (step part)")
    parser.add_argument("--prompt", type=int, default=250, help="prompt tokens of each (step part)")
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed (step part)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating on/off rounds (step part)")
    parser.add_argument("--output", type=Path, help="JSON result (default: none)")
    parser.add_argument("--one-step", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_step:
        print(step_p50_ms(*args.one_step))
        return 0
    result = {"alone": alone() if args.part != "step" else [], "step": step(args) if args.part != "alone" else []}
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
