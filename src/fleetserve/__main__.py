"""`python -m fleetserve` runs the CLI."""

from fleetserve.cli import main

raise SystemExit(main())
