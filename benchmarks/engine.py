"""Engine benchmark script: the chat scenario through LLMEngine vs transformers (see fleetserve.bench.engine_bench)."""

from fleetserve.bench.engine_bench import main

raise SystemExit(main())
