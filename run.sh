#!/usr/bin/env bash
# One entry point: sets up .venv when needed, then runs fleetserve or the tests.
#   ./run.sh generate "Why is the sky blue?"   any fleetserve command (see ./run.sh --help)
#   ./run.sh test [pytest options]             the whole test suite
set -euo pipefail
cd "$(dirname "$0")"

if [ "${1:-}" = "test" ]; then
  shift
  scripts/setup.sh --test
  exec .venv/bin/python -m pytest "$@"
fi
scripts/setup.sh
exec .venv/bin/fleetserve "$@"
