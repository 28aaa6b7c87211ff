#!/usr/bin/env bash
# LLaVA-1.5 stage 1: train the projector on LLaVA-558K captions (configs/train/pretrain_llava15.yaml).
# Every path and size is an env variable with a default; extra flags after the script override the config.
set -euo pipefail
cd "$(dirname "$0")/../.."
LLM=${LLM:-lmsys/vicuna-7b-v1.5}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
DATA=${DATA:-playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGES=${IMAGES:-playground/data/LLaVA-Pretrain/images}
OUT=${OUT:-checkpoints/llava-v1.5-7b-pretrain}
BATCH=${BATCH:-32}    # per GPU; global = BATCH x GPUS x ACCUM (LLaVA: 256)
ACCUM=${ACCUM:-1}
source scripts/train_common.sh
"${LAUNCH[@]}" --config configs/train/pretrain_llava15.yaml \
    --model_name_or_path "$LLM" --vision_tower "$VISION_TOWER" --data_path "$DATA" --image_folder "$IMAGES" \
    --output_dir "$OUT" --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" \
    --resume_from_checkpoint auto "$@"
