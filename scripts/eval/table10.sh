#!/usr/bin/env bash
# Table 10: LLaVA-1.5-13B x {576, 192, 128, 64} visual tokens x Table 1's benchmarks through lmms-eval, rendered in
# playground/eval/table10 (our numbers only until the paper's are transcribed: eval/paper/README.md). Resumable.
# Usage: bash scripts/eval/table10.sh
#        GPUS=8 BATCH_SIZE=4 MODEL_PATH=/ckpt/llava-v1.5-13b bash scripts/eval/table10.sh
set -euo pipefail
SPEC=10 exec bash "$(dirname "$0")/grid.sh" "$@"
