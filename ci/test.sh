#!/usr/bin/env bash
# Install hotproxy with its test extra into a fresh venv and run the suite,
# exactly as the README says.  Used by .ci/run; runnable by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-ci}
rm -rf "$VENV"
"$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The README's test command:
pip install '.[test]' && pytest -m 'not slow' "$@"
# The micro-benchmarks, once each with timing off, so they cannot rot:
bash ci/bench.sh
