#!/usr/bin/env bash
# Table 2: LLaVA-NeXT-7B x {2880, 640, 320, 160} visual tokens (VisionZip per crop: 5 x 128/64/32) x 7 benchmarks
# through lmms-eval, rendered beside the paper's numbers (playground/eval/table2). Resumable.
# Usage: bash scripts/eval/table2.sh
#        GPUS=8 BATCH_SIZE=4 MODEL_PATH=/ckpt/llava-v1.6-vicuna-7b bash scripts/eval/table2.sh --rows visionzip-160
# VisionZip‡ rows run once VISIONZIP_FT_NEXT_640/320/160 name their checkpoints. Settings: scripts/eval/grid.sh.
set -euo pipefail
SPEC=2 exec bash "$(dirname "$0")/grid.sh" "$@"
