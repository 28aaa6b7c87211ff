#!/usr/bin/env bash
# The paper in miniature: data (easy-VQA + a small-object split), tiny CLIP, tiny Llama, LLaVA stages 1-2,
# VisionZip and its baselines in both position layouts through lmms-eval, VisionZip‡, the table and plot.
# Each stage is skipped when its output exists (resume).
# OUT: root of every output (default playground/mini, with --smoke playground/mini-smoke); SEEDS: training seeds (default "0"; two or more also write
# $OUT/seeds.md: mean ± sd over seeds and paired tests); SMOKE=1: a few samples and steps per stage.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-}
SEEDS=${SEEDS:-0}
SMOKE=${SMOKE:-0}
# the project's venv (scripts/setup.sh) when there is one, else the python on PATH
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
read -r -a SEED_LIST <<< "$SEEDS"
ARGS=(--seeds "${SEED_LIST[@]}")
[[ -z "$OUT" ]] || ARGS+=(--out "$OUT")
if [[ "$SMOKE" == "1" ]]; then
    ARGS+=(--smoke)
fi
"$PYTHON" -m eval.mini.reproduce "${ARGS[@]}" "$@"
