"""``python -m llava.serve.vllm.overrides MODEL``: the ``--hf-overrides`` JSON that serves MODEL through the plugin."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from llava.serve.vllm import hf_overrides


def main(argv: Sequence[str] | None = None) -> None:
    """Print ``{"architectures": ["VisionZip<architecture>"]}`` for an exported checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m llava.serve.vllm.overrides", description=__doc__)
    parser.add_argument("model", help="an exported llava-hf folder (python -m llava.convert --to-hf)")
    print(json.dumps(hf_overrides(parser.parse_args(argv).model)))


if __name__ == "__main__":
    main()
