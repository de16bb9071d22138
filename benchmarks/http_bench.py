"""HTTP benchmark script: load on a running gateway, and the gateway-overhead scenario (see fleetserve.bench.http_bench)."""

from fleetserve.bench.http_bench import main

raise SystemExit(main())
