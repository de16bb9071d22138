"""Speculative decoding on and off, engine alone, chat and grounded (see fleetserve.bench.speculative_bench)."""

from fleetserve.bench.speculative_bench import main

raise SystemExit(main())
