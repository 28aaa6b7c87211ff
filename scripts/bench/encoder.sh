#!/usr/bin/env bash
# Encoder benchmark: plain SDPA / plain eager / released code's eager path / ours, batch 1 and 5.
# Usage: SMALL=1 bash scripts/bench/encoder.sh        (CPU-sized shape)
#        bash scripts/bench/encoder.sh                 (CLIP ViT-L/14-336 shape; use a GPU)
set -euo pipefail
DOMINANT=${DOMINANT:-54}
CONTEXTUAL=${CONTEXTUAL:-10}
REPEAT=${REPEAT:-10}
OUT=${OUT:-playground/bench/encoder.json}
mkdir -p "$(dirname "$OUT")"
args=(encoder --dominant "$DOMINANT" --contextual "$CONTEXTUAL" --repeat "$REPEAT" --json "$OUT")
if [[ "${SMALL:-0}" == "1" ]]; then args+=(--small); fi
python -m visionzip.bench "${args[@]}" "$@"
