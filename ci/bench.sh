#!/usr/bin/env bash
# Run every micro-benchmark under bench/ once, with timing off: CI's guard
# that they keep working.  No timing is asserted anywhere; for real numbers
# run `pytest bench/` by hand, and `python bench/load.py` for the load runs.
# Expects hotproxy with its test extra installed (ci/test.sh does that).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest bench/ -q -p no:cacheprovider --benchmark-disable "$@"
# The many-services bench at its smallest (10 and 300 services, ~30 s; no
# goal is asserted: it fails only if hotproxy cannot start or reload).
python bench/scale.py --quick --no-haproxy
