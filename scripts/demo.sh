#!/usr/bin/env bash
# A 20-second demo (after scripts/setup.sh): a tiny random LLaVA-1.5 checkpoint in the released on-disk layout,
# asked about the sample photo without and with VisionZip (random weights: the words mean nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-playground/tiny-llava}
DOMINANT=${DOMINANT:-18}     # the tiny tower gives 64 patches + [CLS]: 18 + 4 keeps about 1/3, as 192/576
CONTEXTUAL=${CONTEXTUAL:-4}

[[ -f "$OUT/llava-v1.5-tiny/config.json" ]] || "$PYTHON" -m llava.tiny --out "$OUT"
"$PYTHON" -m llava.eval.run_llava \
  --model-path "$OUT/llava-v1.5-tiny" \
  --image-file llava/serve/examples/chelsea.jpg \
  --query "What is in the image?" \
  --visionzip-dominant "$DOMINANT" --visionzip-contextual "$CONTEXTUAL" \
  --max-new-tokens 16 --compare "$@"
