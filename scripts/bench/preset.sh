#!/usr/bin/env bash
# One issue's benchmark run (python -m llava.bench --preset): time to first token, decoding, FLOPs, KV cache and
# memory as ratios to vanilla; Markdown table, JSON and PNG in $OUT.
#   methods: every method at equal budget (VisionZip, DivPrune, VisPruner, CDPruner, FastV, PDrop, SparseVLM),
#            LLaVA-1.5-7B at 64 and LLaVA-NeXT-7B at 160 (32 per view), each method's own cost beside the encoder's
#   table7:  LLaVA-NeXT-13B with VisionZip at 640/320/160 against LLaVA-NeXT-7B with every token (paper's Table 7)
#   table6:  LLaVA-NeXT-13B with VisionZip at 320 in full, 8-bit and 4-bit weights (paper's Tables 6 and 16)
# Usage (GPU, real shapes, fp16):  bash scripts/bench/preset.sh methods
#        CPU stand-in:             SCALE=0.0625 THREADS=1 CLOCK=cpu bash scripts/bench/preset.sh methods
#                                  SCALE=0.125 THREADS=1 bash scripts/bench/preset.sh table7  (0.125: 13B/7B widths and
#                                  depths keep their ratios, 5/4)
# Extra flags go to `python -m llava.bench` after the preset's, and override them (e.g. --budgets, --dtype).
set -euo pipefail
PRESET=${1:?usage: bash scripts/bench/preset.sh methods|table7|table6 [flags for python -m llava.bench]}
shift
SCALE=${SCALE:-1}      # < 1 shrinks widths (and depths unless --depth full) for a CPU; token counts stay
DECODE=${DECODE:-8}
REPEAT=${REPEAT:-5}
WARMUP=${WARMUP:-1}
THREADS=${THREADS:-}
CLOCK=${CLOCK:-wall}   # cpu: this process's CPU time (CPU runs on a shared host)
OUT=${OUT:-playground/bench/$PRESET}

args=(--preset "$PRESET" --scale "$SCALE" --decode-tokens "$DECODE" --repeat "$REPEAT" --warmup "$WARMUP"
      --clock "$CLOCK" --out "$OUT")
if [[ -n "$THREADS" ]]; then args+=(--threads "$THREADS"); fi
python -m llava.bench "${args[@]}" "$@"
