#!/usr/bin/env bash
# VisionZip‡ for LLaVA-NeXT (1.6): the projector alone on compressed AnyRes crops (configs/train/visionzip_ft_llava16.yaml).
# DOMINANT+CONTEXTUAL per crop: 108+20 (the paper's 640), 54+10 (320), 27+5 (160); BUDGET=total for a per-image total.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-liuhaotian/llava-v1.6-vicuna-7b}
VISION_TOWER=${VISION_TOWER:-}
DATA=${DATA:-playground/data/llava_v1_5_mix665k.json}
IMAGES=${IMAGES:-playground/data}
DOMINANT=${DOMINANT:-108}
CONTEXTUAL=${CONTEXTUAL:-20}
BUDGET=${BUDGET:-per_crop}
FRACTION=${FRACTION:-0.1}
OUT=${OUT:-checkpoints/llava-v1.6-7b-visionzip-$((DOMINANT + CONTEXTUAL))x5}
BATCH=${BATCH:-8}
ACCUM=${ACCUM:-2}
source scripts/train_common.sh
"${LAUNCH[@]}" --config configs/train/visionzip_ft_llava16.yaml \
    --model_name_or_path "$MODEL" ${VISION_TOWER:+--vision_tower "$VISION_TOWER"} --data_path "$DATA" \
    --image_folder "$IMAGES" --visionzip_dominant "$DOMINANT" --visionzip_contextual "$CONTEXTUAL" \
    --visionzip_budget "$BUDGET" --data_fraction "$FRACTION" --output_dir "$OUT" \
    --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" --resume_from_checkpoint auto "$@"
