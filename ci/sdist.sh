#!/usr/bin/env bash
# Build the sdist as a user downloads it, check what it holds, and collect its
# tests from the unpacked tree (every test module imports: the helpers they
# need are in it).  Expects the venv ci/test.sh made (hotproxy and its test
# extra installed); run by ci/test.sh before the suite.  Building a wheel
# from it and running the whole suite there is the manual check that
# docs/architecture.md ("Building and testing") describes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-ci}
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q build
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
python -m build --sdist --outdir "$OUT/dist" . >"$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; exit 1; }
SDIST=$(ls "$OUT"/dist/hotproxy-*.tar.gz)
python - "$SDIST" <<'PY'
import sys, tarfile
names = [n.split("/", 1)[1] for n in tarfile.open(sys.argv[1]).getnames() if "/" in n]
need = ["LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "src/hotproxy/_core.pyx",
        "src/hotproxy/_core.pxd", "src/hotproxy/_core.pyi", "src/hotproxy/py.typed",
        "src/hotproxy/default.toml", "tests/conftest.py", "tests/helpers_program.py",
        "tests/services.py", "tests/traffic.py", "docs/architecture.md"]
missing = [n for n in need if n not in names]
generated = [n for n in names if n.endswith((".c", ".so", ".html", ".pyc"))]
print(f"sdist {sys.argv[1].rsplit('/', 1)[1]}: {len(names)} entries")
if missing or generated:
    sys.exit(f"sdist: missing {missing}, generated files in it {generated}")
PY
tar -xzf "$SDIST" -C "$OUT"
SRC=$(ls -d "$OUT"/hotproxy-*/)
# collection errors fail this (exit 2); the count is printed without the list
(cd "$SRC" && python -m pytest --collect-only -q -p no:cacheprovider -m 'not slow' >"$OUT/collect.log" 2>&1) \
    || { tail -30 "$OUT/collect.log"; exit 1; }
echo "sdist: $(tail -1 "$OUT/collect.log" | sed 's/ in [0-9.]*s.*//') from the unpacked sdist"
