"""Weight formats end to end: fleetserve bench against fleetserve up per --dtype (see fleetserve.bench.formats_bench)."""

from fleetserve.bench.formats_bench import main

raise SystemExit(main())
