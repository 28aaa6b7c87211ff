"""Export our LLaVA checkpoints to transformers' llava-hf layout: ``python -m llava.convert --to-hf SRC OUT``.

``SRC`` is any checkpoint :func:`llava.model.builder.load_pretrained_model` reads: LLaVA-1.5 (``image_aspect_ratio``
pad or square, ``flat`` merge) becomes ``LlavaForConditionalGeneration``, LLaVA-1.6/NeXT (``anyres`` with
``spatial_unpad``) ``LlavaNextForConditionalGeneration``; a projector-only or LoRA folder (a VisionZip‡ projector)
is exported on its ``--model-base``. ``OUT`` gets what ``from_pretrained(OUT)`` and ``AutoProcessor.from_pretrained
(OUT)`` read (transformers 5.23): config.json, safetensors weights, generation_config.json, the tokenizer, the image
processor, processor_config.json and the chat template.

The export is :func:`llava.model.hf_export.export_to_hf` (weights, config, image token, VisionZip budget) and
:mod:`llava.model.hf_processor` (tokenizer, image processor, chat template), where each step is described.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from llava.logs import quiet_deepspeed_probe
from llava.model.hf_export import export_to_hf


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m llava.convert --to-hf SRC OUT [--model-base BASE]``."""
    parser = argparse.ArgumentParser(prog="python -m llava.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--to-hf", nargs=2, metavar=("SRC", "OUT"), required=True,
                        help="our checkpoint folder (or hub id) and a new folder for the llava-hf export")  # fmt: skip
    parser.add_argument("--model-base", default=None, help="the base LLaVA/LLM of a projector-only or LoRA SRC")
    parser.add_argument("--conv-mode", default=None, help="chat template (default: as run_llava picks it)")
    parser.add_argument("--dtype", default=None, help="dtype of the exported weights (default: the checkpoint's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_deepspeed_probe()  # save_pretrained imports DeepSpeed through accelerate: no training here
    src, out = args.to_hf
    try:
        export_to_hf(src, out, args.model_base, args.conv_mode, args.dtype)
    except ValueError as err:
        parser.error(str(err))
    print(out)


if __name__ == "__main__":
    main()
