#!/usr/bin/env bash
# Install this project into its own virtual environment, VENV (default .venv, created with `python3 -m venv` if absent,
# reused if present): the CPU build of torch (or TORCH=...), then the project with its dev and eval extras (EXTRAS=...),
# every other package at the version in requirements/lock.txt (the exact set CI tested; UNPINNED=1 resolves afresh
# instead; `bash scripts/lock.sh` refreshes the lock). lmms-eval brings PyPI's torchvision, which cannot load beside
# the CPU build of torch and would break `import lmms_eval.evaluator` and transformers' image processors; nothing here
# needs it, so with a CPU torch it is removed and the import checked.
# The interpreter that starts this script (PYTHON, default python3) only creates the venv; nothing is installed into
# it unless asked explicitly with VENV=none (then PYTHON itself is the target, e.g. an environment you manage).
# CI, the quick start and users all install through this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH=${TORCH:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,eval}
LOCK=${LOCK:-requirements/lock.txt}
UNPINNED=${UNPINNED:-0}

if [[ "$VENV" == "none" ]]; then
    TARGET="$PYTHON"   # asked explicitly: install into PYTHON's own environment
    echo "setup.sh: installing into $("$TARGET" -c 'import sys; print(sys.prefix)') (VENV=none)"
else
    if [[ ! -x "$VENV/bin/python" ]]; then
        # Debian and Ubuntu ship venv (and the ensurepip it needs) in a separate package
        if ! "$PYTHON" -c "import venv, ensurepip" 2>/dev/null; then
            echo "setup.sh: $PYTHON cannot create a virtual environment (no venv/ensurepip module);" \
                "on Debian/Ubuntu: apt-get install python3-venv (or PYTHON=another python3.10+)" >&2
            exit 2
        fi
        "$PYTHON" -m venv "$VENV"
        echo "setup.sh: created $VENV"
    else
        echo "setup.sh: reusing $VENV"
    fi
    TARGET="$VENV/bin/python"
fi

PIN=()
if [[ "$UNPINNED" != "1" ]]; then
    [[ -f "$LOCK" ]] || { echo "setup.sh: lock file $LOCK not found (UNPINNED=1 installs without it)" >&2; exit 2; }
    PIN=(-c "$LOCK")
fi
"$TARGET" -m pip install -q "${PIN[@]}" --upgrade pip
"$TARGET" -m pip install -q "$TORCH"   # first, so that no dependency pulls a CUDA build
"$TARGET" -m pip install -q "${PIN[@]}" "$TORCH" -e ".[$EXTRAS]"   # torch named again: the resolver may not change it
if ! "$TARGET" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
    "$TARGET" -m pip uninstall -q -y torchvision
fi
"$TARGET" -c "import lmms_eval.evaluator, llava.model, visionzip"   # fails loudly if the install is broken
[[ "$VENV" == "none" ]] || echo "setup.sh: ready; run with $VENV/bin/python or after: source $VENV/bin/activate"
