"""``python -m llava.tiny``: write a tiny random LLaVA checkpoint and print its folder."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from llava.logs import quiet_deepspeed_probe
from llava.tiny.checkpoint import write_tiny_llava
from llava.tiny.config import FORMATS, SERVABLE_HEAD_DIM, TOKENIZER_KINDS, TinyConfig


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write a tiny checkpoint and print its folder."""
    parser = argparse.ArgumentParser(prog="python -m llava.tiny", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for clip/, tokenizer/ and the checkpoint")
    parser.add_argument("--next", action="store_true", help="LLaVA-1.6 (AnyRes, tuned tower) instead of LLaVA-1.5")
    parser.add_argument("--format", choices=FORMATS, default="safetensors", dest="fmt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=None, help="largest shard in bytes (default: no cap)")
    parser.add_argument(
        "--tokenizer", choices=TOKENIZER_KINDS, default="bpe",
        help="bpe: tokenizer.json; sentencepiece: tokenizer.model and the released LlamaTokenizer config",
    )  # fmt: skip
    parser.add_argument(
        "--servable", action="store_true",
        help=f"language-model heads {SERVABLE_HEAD_DIM} wide (default 16), which vLLM's CPU attention backend runs",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_deepspeed_probe()  # save_pretrained imports DeepSpeed through accelerate: no training here
    cfg = TinyConfig().servable() if args.servable else TinyConfig()
    path = write_tiny_llava(
        args.out, next=args.next, fmt=args.fmt, seed=args.seed, cfg=cfg, shard_size=args.shard_size,
        tokenizer=args.tokenizer,
    )  # fmt: skip
    print(path)
