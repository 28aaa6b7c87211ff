#!/usr/bin/env bash
# Run a table or sweep spec through lmms-eval (one run per row x task; cells with results are skipped, so a crashed
# run resumes), then render it beside the paper's numbers. Called by table1.sh, table2.sh, table10.sh, sweep.sh.
# Usage: SPEC=1|2|10|path/to/sweep.yaml bash scripts/eval/grid.sh [eval.grid flags, e.g. --rows vanilla-576 --dry-run]
# Env:   OUT (results folder), GPUS (>1: accelerate launch, one process per GPU), BATCH_SIZE, MODEL_PATH (checkpoint
#        for rows without their own), LIMIT (questions per task: smoke runs only), LAUNCHER (overrides GPUS).
set -euo pipefail
SPEC=${SPEC:?set SPEC to a table number (1, 2, 10) or a spec YAML}
if [[ "$SPEC" =~ ^[0-9]+$ ]]; then which=(--table "$SPEC"); name="table$SPEC"; else which=(--spec "$SPEC"); name=$(basename "$SPEC" .yaml); fi
OUT=${OUT:-playground/eval/$name}
GPUS=${GPUS:-1}
BATCH_SIZE=${BATCH_SIZE:-1}
if [[ "$GPUS" -gt 1 ]]; then default_launcher="accelerate launch --num_processes $GPUS -m lmms_eval"; else default_launcher="python -m lmms_eval"; fi
LAUNCHER=${LAUNCHER:-$default_launcher}
args=("${which[@]}" --out "$OUT" --launcher "$LAUNCHER" --batch-size "$BATCH_SIZE")
if [[ -n "${MODEL_PATH:-}" ]]; then args+=(--pretrained "$MODEL_PATH"); fi
if [[ -n "${LIMIT:-}" ]]; then args+=(--limit "$LIMIT"); fi
status=0
python -m eval.grid "${args[@]}" "$@" || status=$?
python -m eval.tables "${which[@]}" --results "$OUT"
exit "$status"
