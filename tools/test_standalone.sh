#!/usr/bin/env bash
# Proves a package installs and passes its tests with only its declared dependencies:
# a fresh venv, torch first (the same build `make setup` takes), then the package with its dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."
pkg=${1:?usage: tools/test_standalone.sh keye-<name>}
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
filter() { grep -v "is neither a file nor a directory" || true; }
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt torch 2>&1 | filter
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt "./packages/$pkg[dev]" 2>&1 | filter
echo "standalone: $pkg installed alone; running its tests"
cd "packages/$pkg"
TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests
