#!/usr/bin/env bash
# `make setup`: FFmpeg's shared libraries, a .venv, torch first, then every package editable with
# its dev extras. The Makefile reruns it only when a pyproject, constraints.txt or this file changed.
#
# GPU users: export KEYE_TORCH="torch --index-url https://download.pytorch.org/whl/cu128" (or any pip
# requirement spec) before `make setup` to take a CUDA build instead of the CPU one.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${KEYE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
PIP_QUIET=(-q --disable-pip-version-check)

if ! ldconfig -p 2>/dev/null | grep -q 'libavcodec\.so' || ! command -v ffmpeg >/dev/null; then
  echo "setup: installing FFmpeg (shared libraries for torchcodec, the program for sample media)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
  else
    echo "setup: FFmpeg is missing and this is not root; install it (e.g. sudo apt-get install ffmpeg)" >&2
    exit 1
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
# pip's local-index warnings about missing mirror folders are noise here.
filter() { grep -v "is neither a file nor a directory" || true; }

if [ -n "${KEYE_TORCH:-}" ]; then
  # shellcheck disable=SC2086
  "${PIP[@]}" install "${PIP_QUIET[@]}" $KEYE_TORCH 2>&1 | filter
else
  "${PIP[@]}" install "${PIP_QUIET[@]}" -c constraints.txt torch 2>&1 | filter
fi

# One resolver run over all packages so the local packages satisfy each other's requirements.
"${PIP[@]}" install "${PIP_QUIET[@]}" -c constraints.txt \
  -e "packages/keye-dsa[dev,hf]" \
  -e "packages/keye-vision[dev,hf]" \
  -e "packages/keye-moe[dev,hf]" \
  -e "packages/keye-train[dev,dsa]" \
  -e "packages/keye-agents[dev]" 2>&1 | filter
echo "setup: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
