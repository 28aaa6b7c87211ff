"""``python -m llava.serve.vllm.overrides MODEL``: the ``--hf-overrides`` JSON that serves MODEL through the plugin
(``--dtype``: the dtype MODEL was saved in instead)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from llava.serve.vllm import hf_overrides, saved_dtype


def main(argv: Sequence[str] | None = None) -> None:
    """Print ``{"architectures": ["VisionZip<architecture>"]}`` for an exported checkpoint, or with ``--dtype`` the
    dtype its weights were saved in."""
    parser = argparse.ArgumentParser(prog="python -m llava.serve.vllm.overrides", description=__doc__)
    parser.add_argument("model", help="an exported llava-hf folder (python -m llava.convert --to-hf)")
    parser.add_argument("--dtype", action="store_true", help="print the saved dtype (vLLM's --dtype) instead")
    args = parser.parse_args(argv)
    print(saved_dtype(args.model) if args.dtype else json.dumps(hf_overrides(args.model)))


if __name__ == "__main__":
    main()
