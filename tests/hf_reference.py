"""transformers' own answers for the reference tests, computed in a process of their own.

``python -m tests.hf_reference REQUEST RESPONSE`` reads a JSON request (``prompts``: lists of token ids,
``new_tokens``) and writes a JSON response: ``greedy``, each prompt's greedy continuation from
``model.generate``, and ``first_logits``, the next-token logits after the first prompt. The model is loaded
from the GGUF file by transformers (its de-quantizer, not ours), in float32.

The test session starts it as soon as it knows a reference test will run, so that loading the model and
generating (half a minute) overlap the tests before; it runs on one thread, leaving the session's other core
to them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def answer(request: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from fleetserve.model_files import DEFAULT_MODEL, KNOWN_MODELS

    torch.set_num_threads(1)
    path = KNOWN_MODELS[DEFAULT_MODEL].path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    greedy = []
    n = request["new_tokens"]
    with torch.no_grad():
        for prompt in request["prompts"]:
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=n,
                min_new_tokens=n,  # masks EOS as the engine's min_tokens does
                do_sample=False,
            )
            greedy.append(out[0, len(prompt) :].tolist())
        first_logits = model(torch.tensor([request["prompts"][0]])).logits[0, -1].tolist()
    return {"greedy": greedy, "first_logits": first_logits}


if __name__ == "__main__":
    request_file, response_file = map(Path, sys.argv[1:3])
    result = answer(json.loads(request_file.read_text()))
    partial = response_file.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    partial.rename(response_file)
