#!/usr/bin/env bash
# Refresh requirements/lock.txt: install the project with every extra CI and users take (dev, eval, train, demo) into a
# fresh virtual environment, resolving afresh, and write the exact versions that resolved. torch is left out: TORCH
# in scripts/setup.sh pins it (a CPU or a CUDA build, whose wheels differ per machine).
# Then run `bash .ci/run` (it installs from the new lock and runs the tests) and commit the lock with the change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
LOCK=${LOCK:-requirements/lock.txt}
VENV=$(mktemp -d)/venv
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH"
"$VENV/bin/python" -m pip install -q "$TORCH" -e ".[dev,eval,train,demo]"
# Frozen before setup.sh removes torchvision beside a CPU torch: lmms-eval requires it, so its version is locked too.
{
    echo "# The exact versions CI tested (Linux x86_64, Python 3.11), applied by scripts/setup.sh as pip constraints."
    echo "# Refresh: bash scripts/lock.sh. Not listed: torch (TORCH in setup.sh) and this project."
    "$VENV/bin/python" -m pip freeze --all --exclude-editable | grep -v -i -E '^(torch|llava-visionzip)([=@ ]|$)'
} > "$LOCK"
echo "wrote $LOCK ($(grep -c '==' "$LOCK") pins) from $VENV"
