"""Weight-format quality: perplexity on a held-out text and greedy agreement (see fleetserve.bench.quality)."""

import sys
from pathlib import Path

# This folder's http.py would shadow the standard library's http for the tokenizer's imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from fleetserve.bench.quality import main  # noqa: E402

raise SystemExit(main())
