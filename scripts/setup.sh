#!/usr/bin/env bash
# Install this project into the current Python: the CPU build of torch (or TORCH=...), then the project with its
# dev and eval extras, every other package at the version in requirements/lock.txt (the exact set CI tested;
# UNPINNED=1 resolves afresh instead; `bash scripts/lock.sh` refreshes the lock). lmms-eval brings PyPI's
# torchvision, which cannot load beside the CPU build of torch and would break `import lmms_eval.evaluator` and
# transformers' image processors; nothing here needs it, so with a CPU torch it is removed and the import checked.
# CI, the quick start and users all install through this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,eval}
LOCK=${LOCK:-requirements/lock.txt}
UNPINNED=${UNPINNED:-0}

PIN=()
if [[ "$UNPINNED" != "1" ]]; then
    [[ -f "$LOCK" ]] || { echo "setup.sh: lock file $LOCK not found (UNPINNED=1 installs without it)" >&2; exit 2; }
    PIN=(-c "$LOCK")
fi
"$PYTHON" -m pip install -q "${PIN[@]}" --upgrade pip
"$PYTHON" -m pip install -q "$TORCH"   # first, so that no dependency pulls a CUDA build
"$PYTHON" -m pip install -q "${PIN[@]}" "$TORCH" -e ".[$EXTRAS]"   # torch named again: the resolver may not change it
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
    "$PYTHON" -m pip uninstall -q -y torchvision
fi
"$PYTHON" -c "import lmms_eval.evaluator, llava.model, visionzip"   # fails loudly if the install is broken
