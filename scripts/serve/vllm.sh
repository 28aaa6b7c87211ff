#!/usr/bin/env bash
# Serve an exported llava-hf checkpoint (python -m llava.convert --to-hf) with vLLM's OpenAI-compatible server,
# through the VisionZip plugin (llava/serve/vllm): the budget is the checkpoint's `visionzip` key in config.json (none:
# all visual tokens, as vLLM's stock class). Runs in the serve venv (bash scripts/setup_serve.sh).
#   MODEL=playground/export bash scripts/serve/vllm.sh [more `vllm serve` options]
# Variables: MODEL (required), HOST (127.0.0.1: this machine only; 0.0.0.0 opens it to the network), PORT (8000),
# MAX_MODEL_LEN (default: the model's own limit, its max_position_embeddings), DTYPE (default: the dtype the export
# was saved in; vLLM's `auto` would cast float32 to bfloat16 on a CPU), NAME (the served model name: MODEL's folder
# name), VENV (.venv-serve), VLLM_CPU_KVCACHE_SPACE (GiB of KV cache on a CPU, 4).
# Then chat at http://$HOST:$PORT/v1/chat/completions (an image as an image_url part), or evaluate through
# lmms-eval's OpenAI model: OPENAI_API_BASE=http://127.0.0.1:$PORT/v1 OPENAI_API_KEY=EMPTY \
#   python -m lmms_eval --model openai --model_args model_version=$NAME --tasks mme
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:?set MODEL to an exported checkpoint folder}
VENV=${VENV:-.venv-serve}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
NAME=${NAME:-$(basename "$MODEL")}
DTYPE=${DTYPE:-$("$VENV/bin/python" -m llava.serve.vllm.overrides --dtype "$MODEL")}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}   # GiB of KV cache when vLLM runs on a CPU

OVERRIDES=$("$VENV/bin/python" -m llava.serve.vllm.overrides "$MODEL")
# `vllm serve` reads the version of a package named vllm, which vllm-cpu is not: the server's own module takes the same
# options (`--model`).
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name "$NAME" \
    --host "$HOST" --port "$PORT" --dtype "$DTYPE" ${MAX_MODEL_LEN:+--max-model-len "$MAX_MODEL_LEN"} \
    --hf-overrides "$OVERRIDES" "$@"
