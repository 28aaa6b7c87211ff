#!/usr/bin/env bash
# LLaVA-1.5 stage 2 with LoRA (configs/train/finetune_lora_llava15.yaml); load with --model-base $LLM.
# With VisionZip in the loop: DOMINANT=54 CONTEXTUAL=10 (64 tokens), 108+20 (128) or 162+30 (192).
set -euo pipefail
cd "$(dirname "$0")/../.."
LLM=${LLM:-lmsys/vicuna-7b-v1.5}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
PROJECTOR=${PROJECTOR:-checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin}
DATA=${DATA:-playground/data/llava_v1_5_mix665k.json}
IMAGES=${IMAGES:-playground/data}
BATCH=${BATCH:-16}
ACCUM=${ACCUM:-1}
source scripts/train_common.sh
OUT=${OUT:-checkpoints/llava-v1.5-7b-lora$VISIONZIP_SUFFIX}
"${LAUNCH[@]}" --config configs/train/finetune_lora_llava15.yaml \
    --model_name_or_path "$LLM" --vision_tower "$VISION_TOWER" --pretrain_mm_mlp_adapter "$PROJECTOR" \
    --data_path "$DATA" --image_folder "$IMAGES" --output_dir "$OUT" "${VISIONZIP[@]}" \
    --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" --resume_from_checkpoint auto "$@"
