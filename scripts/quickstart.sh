#!/usr/bin/env bash
# The quick start's main job: set up (CPU torch + this project + lmms-eval), then the paper in miniature on 2 CPU
# cores (~20 min from nothing, install included): data, a tiny CLIP, LLaVA stages 1-2 and VisionZip‡ through DeepSpeed,
# VisionZip and its baselines through lmms-eval, and the table + plot in playground/mini/. Interrupted? Run it again:
# finished stages are skipped. Flags go to `python -m eval.mini.reproduce` (e.g. --smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}

PYTHON="$PYTHON" TORCH="$TORCH" bash scripts/setup.sh
PYTHON="$PYTHON" bash scripts/mini/reproduce.sh "$@"
