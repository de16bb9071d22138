"""Speculative decoding on and off, engine alone, chat and grounded (see fleetserve.bench.speculative_bench)."""

import sys
from pathlib import Path

# This folder's http.py would shadow the standard library's http for the libraries' imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from fleetserve.bench.speculative_bench import main  # noqa: E402

raise SystemExit(main())
