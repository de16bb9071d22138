"""The transformers baseline of the engine benchmark: ``generate`` one request at a time, in a subprocess of its own.

The subprocess has its own peak RSS; it reads hf_baseline's keyword arguments as JSON on stdin and writes its row as
JSON on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fleetserve.bench.memory import peak_rss_bytes, reset_peak_rss
from fleetserve.bench.traces import RequestTrace, summarize


def _token_clock_class():
    """The TokenClock class: a transformers streamer, defined here so that transformers is imported only when used."""
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        """Records when generate hands out each new token (its first put is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.seen_prompt = False

        def put(self, value) -> None:
            if self.seen_prompt:
                self.times.append(time.monotonic())
            self.seen_prompt = True

        def end(self) -> None:
            pass

    return TokenClock


class _Generator:
    """A loaded causal LM that generates exactly n tokens, greedy, for one prompt at a time."""

    def __init__(self, model_dir: str, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        started = time.monotonic()
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
        self.load_s = time.monotonic() - started
        self.device = device
        eos = self.model.generation_config.eos_token_id
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        self.pad = pad

    def __call__(self, ids: list[int], n: int, streamer=None) -> int:
        """Generate ``n`` new tokens after ``ids``; return how many came."""
        import torch

        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=self.pad,
                streamer=streamer,
            )
        return int(out.shape[1] - input_ids.shape[1])


def _timed_requests(
    generate: _Generator, prompts: list[list[int]], max_new_tokens: int, token_clock: type
) -> list[RequestTrace]:
    """Run the prompts one after another, each traced with the time of every token (by a ``token_clock``)."""
    traces = []
    for index, ids in enumerate(prompts):
        clock = token_clock()
        trace = RequestTrace(f"hf-{index}", len(ids), arrival=time.monotonic())
        trace.output_tokens = generate(ids, max_new_tokens, clock)
        trace.finish_time = time.monotonic()
        trace.token_times = clock.times
        trace.first_token = clock.times[0] if clock.times else None
        trace.finish_reason = "length"
        traces.append(trace)
    return traces


def hf_baseline(
    model_dir: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """transformers ``generate``, greedy, exactly ``max_new_tokens`` tokens, one prompt at a time (in this process)."""
    import torch

    token_clock = _token_clock_class()
    if threads:
        torch.set_num_threads(threads)
    generate = _Generator(model_dir, device, dtype)
    generate(prompts[0], 2)  # warm-up
    load_peak = peak_rss_bytes()
    rss_reset = reset_peak_rss()
    start = time.monotonic()
    traces = _timed_requests(generate, prompts, max_new_tokens, token_clock)
    row = summarize(traces, time.monotonic() - start)
    row.update(
        peak_rss_bytes=peak_rss_bytes(),
        peak_rss_scope="run" if rss_reset else "process",
        load_peak_rss_bytes=load_peak,
        load_s=generate.load_s,
        device=device,
        dtype=dtype,
        torch_threads=torch.get_num_threads(),
    )
    return row


def worker_main() -> int:
    """Subprocess entry: hf_baseline's keyword arguments as JSON on stdin, its result as JSON on stdout."""
    payload = json.load(sys.stdin)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # anything the libraries print must not mix with the result
    try:
        result = hf_baseline(**payload)
    finally:
        sys.stdout = stdout
    stdout.write(json.dumps(result) + "\n")
    stdout.flush()
    return 0


def run_hf_subprocess(payload: dict[str, Any]) -> dict[str, Any]:
    """Run hf_baseline in a fresh interpreter; on failure return a row of failed requests with the error."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    code = "from fleetserve.bench.hf_baseline import worker_main; raise SystemExit(worker_main())"
    proc = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(payload), capture_output=True, text=True, env=env, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    error = None
    if proc.returncode != 0 or not lines:
        error = f"transformers subprocess exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"
    else:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError as exc:
            error = f"transformers subprocess printed no JSON result ({exc}): {lines[-1][:200]!r}"
    if error is not None:
        row = summarize(
            [RequestTrace(f"hf-{i}", len(ids), error=error) for i, ids in enumerate(payload["prompts"])], 0.0
        )
        row.update(peak_rss_bytes=None, peak_rss_scope=None, error=error)
        return row
    return result
