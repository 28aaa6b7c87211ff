"""The tiny language model of the mini reproduction: a random Llama and a locally trained tokenizer (python -m
eval.mini.base).

The output folder is a plain Hugging Face causal LM (``LlamaForCausalLM`` + tokenizer + generation config), the
``--model_name_or_path`` of LLaVA's stage 1; the vision tower (``--vision_tower``) and the projector are added by
training. The tokenizer is a byte-level BPE, so no text ever maps to <unk>; it is trained on every question, answer,
caption and chat-template string of the mini splits, so that each of their words is one or two tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from eval.mini.data import ANSWER_INSTRUCTION, EASY_ANSWERS, KINDS, SPLITS, human_turn, is_done, write_json
from eval.mini.shapes import COLORS, MULTI_ANSWERS, SHAPES, all_questions, all_small_questions
from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import get_conv_template
from llava.model.tokenizer import load_tokenizer
from llava.tiny import (
    SPECIAL_TOKENS,
    UNK_TOKEN,
    llama_config,
    llama_style_tokenizer,
    save_tokenizer,
    seeded,
    tokenizer_corpus,
)

logger = logging.getLogger(__name__)

TEMPLATES: tuple[str, ...] = ("plain", "vicuna_v1")  # stage 1 and stage 2 of LLaVA-1.5
MANIFEST_VERSION = 1
ANSWER_REPEATS = 50


@dataclass(frozen=True)
class BaseConfig:
    """Sizes of the tiny Llama and its tokenizer; saved in manifest.json and compared on resume."""

    kinds: tuple[str, ...] = ("easy", "small")  # the splits whose questions the tokenizer is trained on
    vocab_size: int = 1000
    model_max_length: int = 512  # text tokens; the 64 image tokens come on top (max_position_embeddings)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 352  # ~8/3 x hidden, rounded to a multiple of 32 as in Llama
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    seed: int = 0

    def __post_init__(self) -> None:
        """Validate that the sizes fit together."""
        checks = {
            "hidden_size % num_heads == 0": self.hidden_size % self.num_heads == 0,
            "num_heads % num_kv_heads == 0": self.num_heads % self.num_kv_heads == 0,
            "vocab_size > number of special tokens": self.vocab_size > len(SPECIAL_TOKENS),
            "max_position_embeddings > model_max_length": self.max_position_embeddings > self.model_max_length,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"BaseConfig: expected {', '.join(failed)}; got {self}")


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer


def easy_questions() -> list[str]:
    """The distinct questions of easy-VQA (train and test)."""
    try:
        import easy_vqa
    except ImportError as err:  # optional: only the mini reproduction needs it
        raise ImportError("the mini tokenizer reads easy-VQA's questions: pip install easy-vqa") from err
    return sorted({q for split in SPLITS for q in getattr(easy_vqa, f"get_{split}_questions")()[0]})


def render(template: str, question: str | None, answer: str) -> str:
    """A one-turn sample as LLaVA renders it for training: `plain` (caption) or a chat template (VQA)."""
    conv = get_conv_template(template)
    if template == "plain":  # LLaVA's preprocess_plain: the placeholder, the caption and the separator
        return DEFAULT_IMAGE_TOKEN + answer + conv.sep
    first = human_turn(question or "")
    conv.append_message(conv.roles[0], first)
    conv.append_message(conv.roles[1], answer)
    return conv.get_prompt()


def mini_corpus(kinds: Sequence[str] = KINDS) -> list[str]:
    """Training text of the tokenizer: tiny.py's English lines, then every question, answer and caption word of the
    `kinds` splits, inside the chat templates LLaVA trains them with (so that their words become single tokens)."""
    questions = [
        *(easy_questions() if "easy" in kinds else []),
        *(all_small_questions() if "small" in kinds else []),
        *(all_questions() if "multi" in kinds else []),
    ]
    answers = sorted({*EASY_ANSWERS, *MULTI_ANSWERS})
    captions = [
        f"a {small}{c} {s}, a {c} {s} and a {c} {s}" for c in COLORS for s in SHAPES for small in ("", "small ")
    ]
    lines = [*tokenizer_corpus(), ANSWER_INSTRUCTION]
    for i, question in enumerate(questions):
        lines.append(render("vicuna_v1", question, answers[i % len(answers)]))
        lines.append(question)
    # answers as the model generates them (" yes</s>"), often enough that each becomes one token
    lines.extend(f"ASSISTANT: {answer}</s>" for answer in answers for _ in range(ANSWER_REPEATS))
    lines.extend(render("plain", None, caption) for caption in captions)
    return lines


def build_mini_tokenizer(cfg: BaseConfig, corpus: Sequence[str]) -> PreTrainedTokenizerFast:
    """The tokenizer: <unk>=0 (also pad, as LLaVA sets it), <s>=1 prepended, </s>=2, right padding."""
    tokenizer = llama_style_tokenizer(corpus, cfg.vocab_size, cfg.model_max_length)
    return tokenizer


def check_texts(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> int:
    """Raise ValueError if a text has an <unk> or does not decode back to itself; return the longest in tokens.

    Texts may hold </s> (the v1 template's separator), which must stay one special token.
    """
    longest = 0
    for text in texts:
        ids = tokenizer(text).input_ids
        if tokenizer.unk_token_id in ids:
            raise ValueError(f"tokenizer produced {UNK_TOKEN} for {text!r}: {ids}")
        decoded = tokenizer.decode(ids[1:], skip_special_tokens=False)  # ids[0] is the prepended <s>
        if decoded != text:
            raise ValueError(f"tokenizer round trip: expected {text!r}, got {decoded!r}")
        longest = max(longest, len(ids))
    return longest


def data_texts(data_dir: Path) -> Iterable[str]:
    """Every sample of the written splits, rendered as training renders it (captions: plain; questions: v1)."""
    for kind in KINDS:
        if not (data_dir / kind / "manifest.json").is_file():
            continue
        for record in json.loads((data_dir / kind / "pretrain.json").read_text()):
            yield render("plain", None, record["conversations"][1]["value"])
        for split in SPLITS:
            for record in json.loads((data_dir / kind / f"{split}.json").read_text()):
                yield render("vicuna_v1", record["question"], record["answer"])


def answer_lengths(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Tokens of each answer as the model generates it after "ASSISTANT:" (with its leading space, without </s>)."""
    answers = sorted({*EASY_ANSWERS, *MULTI_ANSWERS})
    return {a: len(tokenizer(" " + a, add_special_tokens=False).input_ids) for a in answers}


# ----------------------------------------------------------------------------------------------------------------------
# model


def write_base(out_dir: str | Path, cfg: BaseConfig | None = None, data_dir: str | Path | None = None) -> Path:
    """Write the tokenizer and the random Llama to `out_dir` (skipped if its manifest matches).

    With `data_dir` (the folder of eval.mini.data), every written sample is checked to tokenize without <unk> and
    to round-trip, in the template training uses for it.
    """
    cfg = cfg or BaseConfig()
    out_dir = Path(out_dir)
    corpus = mini_corpus(cfg.kinds)
    digest = hashlib.sha256("\n".join(corpus).encode()).hexdigest()
    expected = json.loads(json.dumps({"version": MANIFEST_VERSION, "config": asdict(cfg), "corpus_sha256": digest}))
    if is_done(out_dir, expected, "a tiny base LLM"):
        logger.info("%s already written with these settings: skipping", out_dir)
    else:
        _write(out_dir, cfg, corpus, expected)
    if data_dir is not None:
        tokenizer = load_tokenizer(out_dir)
        longest = check_texts(tokenizer, set(data_texts(Path(data_dir))))  # distinct texts: questions repeat
        logger.info("every sample in %s tokenizes without %s; longest %d text tokens", data_dir, UNK_TOKEN, longest)
    return out_dir


def _write(out_dir: Path, cfg: BaseConfig, corpus: Sequence[str], manifest: dict[str, Any]) -> None:
    """Train the tokenizer, initialise the model, save both with the manifest last."""
    tokenizer = build_mini_tokenizer(cfg, corpus)
    longest = check_texts(tokenizer, [*corpus, *(render(t, "is there a red circle?", "yes") for t in TEMPLATES)])
    lengths = answer_lengths(tokenizer)
    llama = llama_config(cfg, len(tokenizer))
    with seeded(cfg.seed, "mini-llama"):
        model = LlamaForCausalLM(llama)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=llama.bos_token_id, eos_token_id=llama.eos_token_id,
                     pad_token_id=llama.pad_token_id).save_pretrained(out_dir)  # fmt: skip
    save_tokenizer(tokenizer, out_dir)
    params = sum(p.numel() for p in model.parameters())
    info = {
        "parameters": params,
        "vocab_size": len(tokenizer),
        "longest_corpus_text": longest,
        "answer_tokens": lengths,
    }
    write_json(out_dir / "mini_info.json", info)
    write_json(out_dir / "manifest.json", manifest)
    logger.info("tiny Llama (%d parameters, %d tokens) written to %s; answers take %s tokens", params,
                len(tokenizer), out_dir, sorted(set(lengths.values())))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write the tiny base LLM."""
    parser = argparse.ArgumentParser(prog="python -m eval.mini.base", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    parser.add_argument("--data", type=Path, default=None, help="check every sample of this eval.mini.data folder")
    parser.add_argument("--hidden-size", type=int, default=BaseConfig.hidden_size)
    parser.add_argument("--layers", type=int, default=BaseConfig.num_layers)
    parser.add_argument("--heads", type=int, default=BaseConfig.num_heads)
    parser.add_argument("--intermediate-size", type=int, default=BaseConfig.intermediate_size)
    parser.add_argument("--seed", type=int, default=BaseConfig.seed)
    parser.add_argument("--kinds", nargs="+", default=list(BaseConfig.kinds), choices=KINDS,
                        help="the splits whose questions the tokenizer learns")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = BaseConfig(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                     num_kv_heads=args.heads, intermediate_size=args.intermediate_size, seed=args.seed,
                     kinds=tuple(args.kinds))  # fmt: skip
    write_base(args.out, cfg, args.data)


if __name__ == "__main__":
    main()
