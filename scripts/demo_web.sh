#!/usr/bin/env bash
# The web demo (after `EXTRAS=dev,eval,demo bash scripts/setup.sh`): VisionZip on and off side by side in the browser,
# on CPU. MODEL: a checkpoint (default: the built-in tiny random one, written to playground/tiny-llava on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-7860}

MODEL_ARGS=()
[[ -z "$MODEL" ]] || MODEL_ARGS=(--model-path "$MODEL")
GRADIO_ANALYTICS_ENABLED=False exec "$PYTHON" -m llava.serve.gradio_web "${MODEL_ARGS[@]}" --host "$HOST" --port "$PORT" "$@"
