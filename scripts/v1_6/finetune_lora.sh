#!/usr/bin/env bash
# LLaVA-NeXT (1.6) stage 2 with LoRA (configs/train/finetune_lora_llava16.yaml); load with --model-base $LLM.
# With VisionZip in the loop: DOMINANT=108 CONTEXTUAL=20 per crop (640), 54+10 (320), 27+5 (160); BUDGET=total.
set -euo pipefail
cd "$(dirname "$0")/../.."
LLM=${LLM:-lmsys/vicuna-7b-v1.5}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
PROJECTOR=${PROJECTOR:-checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin}
DATA=${DATA:-playground/data/llava_v1_5_mix665k.json}
IMAGES=${IMAGES:-playground/data}
BATCH=${BATCH:-8}
ACCUM=${ACCUM:-2}
source scripts/train_common.sh
OUT=${OUT:-checkpoints/llava-v1.6-7b-lora$VISIONZIP_SUFFIX}
"${LAUNCH[@]}" --config configs/train/finetune_lora_llava16.yaml \
    --model_name_or_path "$LLM" --vision_tower "$VISION_TOWER" --pretrain_mm_mlp_adapter "$PROJECTOR" \
    --data_path "$DATA" --image_folder "$IMAGES" --output_dir "$OUT" "${VISIONZIP[@]}" \
    --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" --resume_from_checkpoint auto "$@"
