"""Weight-format quality: perplexity on a held-out text and greedy agreement (see fleetserve.bench.quality)."""

from fleetserve.bench.quality import main

raise SystemExit(main())
