#!/usr/bin/env bash
# Table 1: LLaVA-1.5-7B x {576, 192, 128, 64} visual tokens x 11 benchmarks through lmms-eval, rendered beside the
# paper's numbers (playground/eval/table1/table1.{md,csv,png}). Resumable: cells already done are skipped.
# Usage: bash scripts/eval/table1.sh
#        GPUS=8 BATCH_SIZE=8 MODEL_PATH=/ckpt/llava-v1.5-7b bash scripts/eval/table1.sh --rows vanilla-576 visionzip-64
# VisionZip‡ rows run once VISIONZIP_FT_7B_192/128/64 name their checkpoints; MMB, MM-Vet and LLaVA-Bench need
# OPENAI_API_KEY (lmms-eval's GPT judges). See scripts/eval/grid.sh for the other settings.
set -euo pipefail
SPEC=1 exec bash "$(dirname "$0")/grid.sh" "$@"
