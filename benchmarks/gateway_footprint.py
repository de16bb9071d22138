"""What an idle gateway costs: its resident memory and its start-up time, for this tree or another checkout.

Starts ``fleetserve gateway`` (no workers) ``--runs`` times from each source folder given (default: this tree's
``src``), alternating between them, and reports for each run the time from launch to its "ready" line, its
resident set size (VmRSS) one second later, and whether libtorch is mapped into it.

    python benchmarks/gateway_footprint.py                          # this tree
    python benchmarks/gateway_footprint.py --src OLD/src --src src  # an older checkout against this one

Writes ``benchmarks/results/gateway-footprint.json``. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fleetserve.bench.local_fleet import free_port
from fleetserve.supervisor import Child, ChildSpec

_here = Path(__file__).resolve().parent

RESULTS = _here / "results" / "gateway-footprint.json"


def measure(src: Path) -> dict:
    """One gateway started from ``src``: seconds to "ready", RSS in MiB, and whether libtorch is mapped."""
    argv = [sys.executable, "-m", "fleetserve", "gateway", "--port", str(free_port())]
    argv += ["--control-port", str(free_port())]
    started = time.monotonic()
    child = Child(ChildSpec("gateway", argv, {"PYTHONPATH": str(src)}, ready="fleetserve gateway ready")).launch()
    try:
        child.wait_ready(120)
        ready_s = time.monotonic() - started
        time.sleep(1.0)
        status = Path(f"/proc/{child.pid}/status").read_text()
        rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        torch_mapped = "libtorch" in Path(f"/proc/{child.pid}/maps").read_text()
    finally:
        child.stop(10)
    return {
        "src": str(src),
        "ready_s": round(ready_s, 3),
        "rss_mib": round(rss_kib / 1024, 1),
        "libtorch": torch_mapped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", action="append", type=Path, help="a source folder to start the gateway from")
    parser.add_argument("--runs", type=int, default=3, help="runs per source folder (default 3)")
    args = parser.parse_args(argv)
    sources = [p.resolve() for p in args.src or [_here.parent / "src"]]
    rows = [measure(src) for _ in range(args.runs) for src in sources]
    for row in rows:
        print(
            f"{row['src']}: ready in {row['ready_s']:.2f} s, {row['rss_mib']:.0f} MiB resident, libtorch {row['libtorch']}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"created": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), "runs": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
