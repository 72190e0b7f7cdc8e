#!/usr/bin/env bash
# Install hotproxy with its test extra into a fresh venv and run the suite,
# exactly as the README says.  Used by .ci/run; runnable by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-ci}
# A compiled core that fails to build or import fails the run (hotproxy.core
# raises at import) instead of skipping the compiled-core tests.
export HOTPROXY_REQUIRE_EXTENSIONS=1
# The fleet tests need a real etcd server: install it; a missing etcd (or etcd
# client library) then fails those tests instead of skipping them.
bash ci/etcd.sh
export HOTPROXY_REQUIRE_PEERS=1
rm -rf "$VENV"
"$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
pip install -q '.[test]'
# Types (pyproject.toml [tool.mypy]: strict on every module)
mypy src/hotproxy
# The sdist: what it holds, and its tests collect from the unpacked tree
VENV="$VENV" bash ci/sdist.sh
# The real peers of the PROXY protocol and SNI tests (nginx stream, HAProxy,
# openssl): installed if missing, and required (HOTPROXY_REQUIRE_PEERS above)
bash ci/peers.sh
# The README's test command:
pytest -m 'not slow' "$@"
# The micro-benchmarks, once each with timing off, so they cannot rot:
bash ci/bench.sh
