# Shared by scripts/v1_5/*.sh and scripts/v1_6/*.sh (sourced, not run): the DeepSpeed launcher line.
# GPUS: processes per node; HOSTFILE: DeepSpeed hostfile for multi-node jobs (empty: this node only).
# DEEPSPEED_CONFIG: configs/deepspeed/{zero2,zero3,zero3_offload}.json. wandb logs offline unless WANDB_MODE says.
GPUS=${GPUS:-8}
HOSTFILE=${HOSTFILE:-}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-configs/deepspeed/zero2.json}
MASTER_PORT=${MASTER_PORT:-29500}
export WANDB_MODE=${WANDB_MODE:-offline}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
LAUNCH=(deepspeed --master_port "$MASTER_PORT" --num_gpus "$GPUS")
if [[ -n "$HOSTFILE" ]]; then
    LAUNCH=(deepspeed --master_port "$MASTER_PORT" --hostfile "$HOSTFILE")
fi
LAUNCH+=(llava/train/train.py --deepspeed "$DEEPSPEED_CONFIG")

# Stage 2 with VisionZip in the loop (the paper's Tables 11 and 17): DOMINANT + CONTEXTUAL tokens per image (per crop
# for AnyRes, or a total over the crops with BUDGET=total); both empty trains on every token. The saved config.json
# carries the budget ("visionzip"), so the checkpoint reloads and evaluates with it. Sets VISIONZIP (the flags) and
# VISIONZIP_SUFFIX (for the output folder: "-vz64", "-vz640-total" with BUDGET=total, "" without VisionZip).
DOMINANT=${DOMINANT:-}
CONTEXTUAL=${CONTEXTUAL:-}
BUDGET=${BUDGET:-per_crop}
VISIONZIP=()
VISIONZIP_SUFFIX=""
if [[ -n "$DOMINANT" || -n "$CONTEXTUAL" ]]; then
    if [[ -z "$DOMINANT" || -z "$CONTEXTUAL" ]]; then
        echo "set both DOMINANT and CONTEXTUAL (e.g. 54 and 10), or neither; got '$DOMINANT' and '$CONTEXTUAL'" >&2
        exit 2
    fi
    VISIONZIP=(--visionzip_dominant "$DOMINANT" --visionzip_contextual "$CONTEXTUAL" --visionzip_budget "$BUDGET")
    VISIONZIP_SUFFIX="-vz$((DOMINANT + CONTEXTUAL))"
    if [[ "$BUDGET" == total ]]; then
        VISIONZIP_SUFFIX+="-total"
    fi
fi
