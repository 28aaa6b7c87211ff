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
