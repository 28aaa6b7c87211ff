#!/usr/bin/env bash
# Ablation sweep: the grid of dominant/contextual splits, merge rules (and layer) in a sweep YAML, through lmms-eval,
# into one table with Avg retention vs vanilla (playground/eval/<sweep name>). Resumable.
# Usage: bash scripts/eval/sweep.sh
#        SWEEP=configs/eval/my_sweep.yaml GPUS=8 BATCH_SIZE=8 bash scripts/eval/sweep.sh --tasks gqa mme
set -euo pipefail
SWEEP=${SWEEP:-configs/eval/sweep.yaml}
SPEC="$SWEEP" exec bash "$(dirname "$0")/grid.sh" "$@"
