#!/usr/bin/env bash
# The paper in miniature (issue 8): data, tiny CLIP, tiny Llama, LLaVA stages 1-2, VisionZip and its baselines
# through lmms-eval, VisionZip‡, the table and plot. Each stage is skipped when its output exists (resume).
# OUT: root of every output (default playground/mini); SMOKE=1: a few samples and steps per stage.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-playground/mini}
SMOKE=${SMOKE:-0}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
ARGS=(--out "$OUT")
if [[ "$SMOKE" == "1" ]]; then
    ARGS+=(--smoke)
fi
"$PYTHON" -m llava.mini.reproduce "${ARGS[@]}" "$@"
