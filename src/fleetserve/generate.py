"""`fleetserve generate`: one prompt's answer streamed to the terminal, from an in-process engine or a gateway."""

from __future__ import annotations

import contextlib
import json
import sys
import time

from fleetserve.contract import SamplingParams
from fleetserve.model_files import resolve_source
from fleetserve.settings.generate import GenerateSettings


def run_generate(s: GenerateSettings, prompt: str) -> int:
    """Generate text for one prompt ('-': standard input), streaming it to the terminal."""
    prompt = prompt if prompt != "-" else sys.stdin.read()
    if s.url:
        return _generate_remote(s, prompt)
    params = SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed,
        ignore_eos=s.ignore_eos,
    ).validate()
    config = s.engine_config()
    resolve_source(config.model.model)  # an unknown model or a missing file is said before torch loads
    from fleetserve.engine.engine import LLMEngine
    from fleetserve.text.detokenizer import IncrementalDetokenizer
    from fleetserve.text.tokenizer import Tokenizer

    engine = LLMEngine(config, progress=True)
    tokenizer = Tokenizer.from_dir(engine.model_dir)
    if s.raw:
        ids = tokenizer.encode(prompt)
    else:
        messages = [{"role": "system", "content": s.system}] if s.system else []
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
    if not s.quiet:
        decode = (n - 1) / (elapsed - (first - start)) if n > 1 and first else 0.0
        print(
            f"[{n} tokens, finish: {finish}, first token {1000 * ((first or start) - start):.0f} ms, "
            f"{decode:.1f} tokens/s after it, {len(ids)} prompt tokens]",
            file=sys.stderr,
        )
    return 0


def _generate_remote(s: GenerateSettings, prompt: str) -> int:
    """Stream a chat completion from a gateway's OpenAI API and print it as it arrives."""
    import urllib.error
    import urllib.request

    messages = [{"role": "system", "content": s.system}] if s.system else []
    body = {
        "model": s.model,
        "messages": messages + [{"role": "user", "content": prompt}],
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if s.top_k:
        body["top_k"] = s.top_k
    if s.seed is not None:
        body["seed"] = s.seed
    if s.ignore_eos:
        body["ignore_eos"] = True
    headers = {"Content-Type": "application/json"}
    if s.api_key:
        headers["Authorization"] = f"Bearer {s.api_key}"
    url = s.url.rstrip("/") + "/v1/chat/completions"
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
    except urllib.error.URLError as exc:
        raise gateway_failure(exc, s.url) from None
    sys.stdout.write("\n")
    if not s.quiet and usage:
        print(
            f"[{usage['completion_tokens']} tokens, finish: {finish}, first token "
            f"{1000 * ((first or start) - start):.0f} ms, {usage['prompt_tokens']} prompt tokens]",
            file=sys.stderr,
        )
    return 0


def gateway_failure(exc: Exception, url: str) -> Exception:
    """A failed call to a gateway (urllib's HTTPError or URLError) as an error that says what happened: the
    gateway's own message for an HTTP error, else why it could not be reached."""
    import urllib.error

    from fleetserve.errors import InvalidRequestError

    if isinstance(exc, urllib.error.HTTPError):
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):  # not an OpenAI error body: show it raw
            detail = json.loads(detail)["error"]["message"]
        return InvalidRequestError(f"the gateway answered {exc.code}: {detail}")
    return InvalidRequestError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}")
