#!/usr/bin/env bash
# The quick start: set up the project's own virtual environment .venv through scripts/setup.sh (created with
# `python3 -m venv` if absent, reused if present; nothing is installed into the python3 that starts this script),
# then the paper in miniature on 2 CPU cores in it (~20 min from nothing, install included): data, a tiny CLIP,
# LLaVA stages 1-2 and VisionZip‡ through DeepSpeed, VisionZip and its baselines through lmms-eval, and the table +
# plot in playground/mini/. Interrupted? Run it again: finished stages are skipped. Flags go to
# `python -m eval.mini.reproduce` (e.g. --smoke: a few samples and steps per stage). VENV, PYTHON (the interpreter
# that creates the venv), TORCH and EXTRAS are passed to scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=${VENV:-.venv}
[[ "$VENV" != "none" ]] || { echo "quickstart.sh: runs in a virtual environment; VENV=none is for setup.sh" >&2; exit 2; }

bash scripts/setup.sh
PYTHON="$VENV/bin/python" bash scripts/mini/reproduce.sh "$@"
