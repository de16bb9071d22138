"""HTTP benchmark script: load on a running gateway, and the gateway-overhead scenario (see fleetserve.bench.http_bench)."""

import sys
from pathlib import Path

# This file shares its name with the standard library's ``http`` package, and Python puts a script's folder first
# on the import path: take that folder off, or ``import http`` (httpx does it) would import this script instead.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

from fleetserve.bench.http_bench import main  # noqa: E402

raise SystemExit(main())
