"""Multi-turn chat about an image on the terminal (LLaVA's ``llava.serve.cli``), encoding the image once.

Usage::

    python -m llava.serve.cli --model-path P --image-file photo.jpg [--visionzip-dominant 54 --visionzip-contextual 10]

VisionZip: the flags' budget, else the checkpoint's saved one (VisionZip‡), else off; ``--no-visionzip`` turns it off.
``--method divprune|vispruner|cdpruner --budget T`` keeps T patches per view chosen by that method instead, ``--method
fastv|pdrop|sparsevlm`` prunes inside the language model; ``--multiturn cache|reprefill`` says whether later turns
keep the first turn's choice of image tokens (default) or choose again for their question (CDPruner and the in-LLM
methods; the text-free ones choose once either way). The conversation is kept on one cache between turns
(:class:`llava.serve.chat.ChatSession`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from llava.cli_options import add_flag, add_model_args, check_visionzip_args, choose_method, load_model
from llava.conversation import Conversation, SeparatorStyle, get_conv_template
from llava.inference import default_conv_mode, summary_line
from llava.mm_utils import load_image
from llava.serve.chat import ChatSession
from visionzip.methods import MULTITURN_MODES

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """LLaVA's ``llava.serve.cli`` flags, plus VisionZip."""
    parser = argparse.ArgumentParser(
        prog="python -m llava.serve.cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    add_flag(parser, "--image-file", required=True)
    parser.add_argument("--temperature", type=float, default=0.2, help="0: greedy decoding")
    add_flag(parser, "--top-p", type=float, default=None)
    add_flag(parser, "--max-new-tokens", type=int, default=512)
    parser.add_argument(
        "--multiturn", choices=MULTITURN_MODES, default="cache",
        help="later turns with cdpruner/fastv/pdrop/sparsevlm: keep the first turn's choice of image tokens on the "
        "cache (cache, default) or run the whole conversation again so the method chooses for the new question "
        "(reprefill)",
    )  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="log the prompt after each turn")
    return parser


def display_roles(conv: Conversation) -> tuple[str, str]:
    """Role names to show (MPT-style templates carry their markers in the roles)."""
    if conv.sep_style == SeparatorStyle.MPT:
        return "user", "assistant"
    return conv.roles[0], conv.roles[1]


def read_turn(prompt: str) -> str:
    """One line from stdin after ``prompt``; '' on EOF."""
    try:
        return input(prompt)
    except EOFError:
        return ""


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Chat until an empty line or EOF; return the answers."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_visionzip_args(parser, args)
    tokenizer, model, image_processor, context_len = load_model(args)
    choice = choose_method(parser, args, model)
    conv = get_conv_template(args.conv_mode or default_conv_mode(model.config))
    images = [load_image(args.image_file)]
    session = ChatSession(model, tokenizer, image_processor, conv, images, context_len, args.multiturn)
    user, assistant = display_roles(conv)
    answers: list[str] = []
    while text := read_turn(f"{user}: ").strip():
        answers.append(session.ask(text, args.temperature, args.top_p, args.max_new_tokens))
        print(f"{assistant}: {answers[-1]}")
        label = choice.describe()
        line = summary_line(
            session.tokens_before, session.tokens_after, session.last_ttft_ms, label, session.layer_average
        )
        print(line, flush=True)
        if args.debug:
            logger.info("prompt: %r", conv.get_prompt())
    print()
    return answers


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
