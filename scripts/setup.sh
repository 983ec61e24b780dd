#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch 2.13.0 installed
# *before* the package (so no CUDA wheels are pulled), then graphprune itself (editable) with test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
