#!/usr/bin/env bash
# LLaVA efficiency benchmark: vanilla / the released VisionZip code's path / ours, at the paper's budgets:
# time to first token by stage, decoding per token, peak memory, FLOPs; Markdown table, JSON and PNG in $OUT.
# Usage (GPU, real shapes, fp16):  bash scripts/bench/prefill.sh
#        LLaVA-NeXT, 7B and 13B:    MODEL="llava-next-7b llava-next-13b" bash scripts/bench/prefill.sh
#        CPU stand-in:             MODEL=llava-1.5-7b SCALE=0.5 THREADS=1 REPEAT=3 DECODE=4 bash scripts/bench/prefill.sh
# Extra flags go to `python -m llava.bench` (e.g. --dtype bfloat16, --attn flash_attention_2, --batch 4).
set -euo pipefail
MODEL=${MODEL:-"llava-1.5-7b llava-1.5-13b llava-next-7b llava-next-13b"}
BUDGETS=${BUDGETS:-}            # empty: the paper's (192 128 64 for LLaVA-1.5, 640 320 160 for LLaVA-NeXT)
SCALE=${SCALE:-1}               # < 1 shrinks widths and depths (token counts stay) for a CPU
TEXT_TOKENS=${TEXT_TOKENS:-60}  # a POPE-like prompt
BATCH=${BATCH:-1}
DECODE=${DECODE:-8}
REPEAT=${REPEAT:-5}
WARMUP=${WARMUP:-1}
ATTN=${ATTN:-sdpa}
THREADS=${THREADS:-}
OUT=${OUT:-playground/bench/prefill}

# shellcheck disable=SC2206  # MODEL and BUDGETS are space-separated lists
args=(--model $MODEL --scale "$SCALE" --text-tokens "$TEXT_TOKENS" --batch "$BATCH" --decode-tokens "$DECODE"
      --repeat "$REPEAT" --warmup "$WARMUP" --attn "$ATTN" --out "$OUT")
# shellcheck disable=SC2206
if [[ -n "$BUDGETS" ]]; then args+=(--budgets $BUDGETS); fi
if [[ -n "$THREADS" ]]; then args+=(--threads "$THREADS"); fi
python -m llava.bench "${args[@]}" "$@"
