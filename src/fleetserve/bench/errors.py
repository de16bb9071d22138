"""The benchmarks' error: a benchmark cannot run as asked."""

from __future__ import annotations

from fleetserve.errors import FleetServeError


class BenchError(FleetServeError):
    """The benchmark cannot run as asked (bad options, a server that refuses the warm-up, a missing package)."""
