#!/usr/bin/env bash
# VisionZip‡ for LLaVA-1.5: the projector alone on DOMINANT+CONTEXTUAL compressed tokens, FRACTION of LLaVA-665K
# (configs/train/visionzip_ft_llava15.yaml). The paper's budgets: 54+10 (64), 108+20 (128), 162+30 (192).
# Output: mm_projector.bin + config.json; evaluate with --model-path $OUT --model-base $MODEL.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-liuhaotian/llava-v1.5-7b}
VISION_TOWER=${VISION_TOWER:-}   # a local copy of the CLIP the checkpoint names, if the hub is out of reach
DATA=${DATA:-playground/data/llava_v1_5_mix665k.json}
IMAGES=${IMAGES:-playground/data}
DOMINANT=${DOMINANT:-54}
CONTEXTUAL=${CONTEXTUAL:-10}
FRACTION=${FRACTION:-0.1}
OUT=${OUT:-checkpoints/llava-v1.5-7b-visionzip-$((DOMINANT + CONTEXTUAL))}
BATCH=${BATCH:-16}    # per GPU; global = BATCH x GPUS x ACCUM (128 as LLaVA's stage 2)
ACCUM=${ACCUM:-1}
CONFIG=${CONFIG:-configs/train/visionzip_ft_llava15.yaml}
source scripts/train_common.sh
"${LAUNCH[@]}" --config "$CONFIG" \
    --model_name_or_path "$MODEL" ${VISION_TOWER:+--vision_tower "$VISION_TOWER"} --data_path "$DATA" \
    --image_folder "$IMAGES" --visionzip_dominant "$DOMINANT" --visionzip_contextual "$CONTEXTUAL" \
    --data_fraction "$FRACTION" --output_dir "$OUT" --per_device_train_batch_size "$BATCH" \
    --gradient_accumulation_steps "$ACCUM" --resume_from_checkpoint auto "$@"
