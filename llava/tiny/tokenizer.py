"""The tiny model's tokenizers, trained on a built-in English corpus: a byte-level BPE (tokenizer.json) or a
sentencepiece BPE in the released LlamaTokenizer layout; both with Llama's special tokens <unk>=0, <s>=1, </s>=2."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava.model.tokenizer import FAST_FILE, SENTENCEPIECE_FILE, SPIECE_UNDERLINE
from llava.tiny.config import (
    BOS_TOKEN,
    BYTE_PIECES,
    EOS_TOKEN,
    SPECIAL_TOKENS,
    SYSTEM_PROMPT,
    UNK_TOKEN,
    TinyConfig,
    write_json,
)

logger = logging.getLogger(__name__)

_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "gold")
_SHAPES = ("circle", "square", "triangle", "rectangle", "star", "heart", "oval", "diamond", "hexagon", "cube", "sphere")
_OBJECTS = (
    "cat", "dog", "cup", "car", "tree", "house", "person", "bird", "boat", "book", "chair", "table",
    "phone", "clock", "flower", "horse", "bus", "train", "plane", "pizza", "kite", "ball", "window", "bottle",
)  # fmt: skip
_SENTENCES = (
    "USER: <image>\nWhat is in the image? ASSISTANT: A cat.",
    "Describe the image in detail.",
    "What color is the cat? How many objects are there in the picture?",
    "Is there a person in this photo? Where is the cup placed? What is the man holding in his hand?",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "The image shows a cat lying on a soft blanket next to a window, looking at the camera.",
    "A cup of coffee sits on a wooden table, with a saucer and a small spoon beside it.",
    "There are three apples, two bananas and one orange in the bowl.",
    "The sky is clear and blue; the sun is shining over the mountains and the lake.",
    "A dog is running across the green grass in the park while children play.",
    "Two people are riding bicycles along the street near the river at night.",
    'The text on the sign reads "STOP" in large white letters.',
    "It is a photograph taken outdoors during the day. Yes. No. Maybe, I am not sure.",
    "(A) left (B) right (C) top (D) bottom. The answer is B!",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 20 42 64 100 256 1000 2024 3.14 50% $5 #1",
    "Punctuation: . , ; : ! ? ' \" ( ) [ ] { } - _ / \\ @ & * + = < > ~ | ` ^",
    "one two three four five six seven eight nine ten first second third last big small large tiny",
    "above below under over behind front inside outside near far between on in at of with without",
    "The scene is a kitchen, a bedroom, a street, a beach, a forest, an office, a classroom or an airport.",
    "The weather looks sunny, cloudy, rainy, foggy or snowy; people wear jackets, hats and glasses.",
    "Please read the words, count the animals, and explain why the picture is funny or unusual.",
)


def tokenizer_corpus() -> list[str]:
    """The built-in English training text: the LLaVA system prompt, chat roles, questions, colours, shapes, digits."""
    lines = [SYSTEM_PROMPT, *_SENTENCES]
    for colour in _COLOURS:
        lines.extend(f"USER: Is the {shape} {colour}? ASSISTANT: Yes, the {shape} is {colour}." for shape in _SHAPES)
        lines.extend(f"There is a {colour} {obj} in the image. {obj.capitalize()}s are {colour}." for obj in _OBJECTS)
        lines.append(f"{colour.capitalize()} {colour.upper()}")
    return lines


def train_bpe_backend(corpus: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `corpus`; Llama's special tokens take ids 0, 1, 2 and BOS is prepended."""
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return backend


def _check_round_trip(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> None:
    """Raise ValueError unless every text encodes without <unk> and decodes back to itself."""
    for text in texts:
        ids = tokenizer(text).input_ids
        if tokenizer.unk_token_id in ids:
            raise ValueError(f"tokenizer produced {UNK_TOKEN} for {text!r}: {ids}")
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        if decoded != text:
            raise ValueError(f"tokenizer round trip: expected {text!r}, got {decoded!r}")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Save with `save_pretrained` plus the special_tokens_map.json that released checkpoints carry.

    transformers 5 no longer writes that file (the special tokens live in tokenizer_config.json).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    special_map = {"unk_token": UNK_TOKEN, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": UNK_TOKEN}
    write_json(out_dir / "special_tokens_map.json", special_map)


def llama_style_tokenizer(corpus: Sequence[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A BPE trained on `corpus` with Llama's conventions: <unk>=0 (also pad, as LLaVA sets it), <s>=1 prepended,
    </s>=2, right padding."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe_backend(corpus, vocab_size),
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    expected = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    got = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    if got != expected:
        raise ValueError(f"special token ids: expected {expected}, got {got}")
    return tokenizer


def build_tokenizer(out_dir: str | Path, cfg: TinyConfig | None = None) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer with Llama's special tokens and save it to `out_dir`.

    Writes tokenizer.json, tokenizer_config.json (both via `save_pretrained`) and special_tokens_map.json, so that
    `AutoTokenizer.from_pretrained(out_dir)` gives the same tokenizer: <unk>=0 (also the pad token, as LLaVA sets it),
    <s>=1 prepended once by the post-processor, </s>=2, model_max_length and right padding as in LLaVA.
    """
    cfg = cfg or TinyConfig()
    out_dir = Path(out_dir)
    tokenizer = llama_style_tokenizer(tokenizer_corpus(), cfg.vocab_size, cfg.model_max_length)
    _check_round_trip(tokenizer, [*tokenizer_corpus(), " two  spaces ", "\tTabs\nand newlines\n", "Unicode: é 猫 🐱"])
    save_tokenizer(tokenizer, out_dir)
    logger.info("tokenizer with %d tokens written to %s", len(tokenizer), out_dir)
    return tokenizer


def train_sentencepiece(corpus: Sequence[str], vocab_size: int) -> bytes:
    """Train a sentencepiece BPE on `corpus` as Llama's tokenizer.model was trained; return the serialized model.

    Llama's settings: <unk>=0, <s>=1, </s>=2, no pad piece, byte fallback, the identity normalizer with a dummy
    prefix and whitespace kept as it is, digits split, whitespace-only pieces allowed. Every character of the
    corpus is kept (character_coverage 1.0), so `vocab_size` must hold the 3 special pieces, the 256 byte pieces
    and those characters. One thread: the same corpus gives the same bytes.
    """
    characters = set("".join(corpus).replace(" ", SPIECE_UNDERLINE)) | {SPIECE_UNDERLINE}
    required = len(SPECIAL_TOKENS) + BYTE_PIECES + len(characters)
    if vocab_size < required:
        raise ValueError(
            f"a sentencepiece vocabulary needs {len(SPECIAL_TOKENS)} special + {BYTE_PIECES} byte + "
            f"{len(characters)} character pieces: expected vocab_size >= {required}, got {vocab_size}"
        )
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, num_threads=1,
        minloglevel=1,  # warnings and errors only: the trainer logs every step at level 0
    )  # fmt: skip
    return model.getvalue()


def _check_sentencepiece(model: bytes, texts: Sequence[str]) -> sentencepiece.SentencePieceProcessor:
    """Raise ValueError unless the special pieces have Llama's ids and every text encodes without <unk> and decodes
    back to itself; return the processor."""
    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    got = [processor.id_to_piece(i) for i in range(len(SPECIAL_TOKENS))]
    if got != list(SPECIAL_TOKENS):
        raise ValueError(f"sentencepiece special pieces: expected {list(SPECIAL_TOKENS)} at ids 0.., got {got}")
    for text in texts:
        ids = processor.encode(text)
        if processor.unk_id() in ids:
            raise ValueError(f"sentencepiece produced {UNK_TOKEN} for {text!r}: {ids}")
        if processor.decode(ids) != text:
            raise ValueError(f"sentencepiece round trip: expected {text!r}, got {processor.decode(ids)!r}")
    return processor


def _released_added_token(content: str, with_type: bool) -> dict[str, Any]:
    """An AddedToken as transformers 4.31 serialised it (tokenizer_config.json adds `__type`)."""
    token = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if with_type else token


def released_tokenizer_config(legacy: bool, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json as the released LLaVA-1.5 checkpoints ship it (LLaVA's training saved Vicuna-v1.5's).

    `legacy` is false in those files; true is the older Llama/Vicuna behaviour (a "▁" after each special token).
    The pad token is null here and "<unk>" in special_tokens_map.json, as LLaVA left them.
    """
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _released_added_token(BOS_TOKEN, with_type=True),
        "clean_up_tokenization_spaces": False,
        "eos_token": _released_added_token(EOS_TOKEN, with_type=True),
        "legacy": legacy,
        "model_max_length": model_max_length,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _released_added_token(UNK_TOKEN, with_type=True),
    }


def save_sentencepiece_tokenizer(model: bytes, out_dir: str | Path, legacy: bool, model_max_length: int) -> None:
    """Write tokenizer.model, the released tokenizer_config.json and special_tokens_map.json (no tokenizer.json:
    one left by an earlier write is removed, so that the folder is read from the sentencepiece file)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FAST_FILE).unlink(missing_ok=True)
    (out_dir / SENTENCEPIECE_FILE).write_bytes(model)
    write_json(out_dir / "tokenizer_config.json", released_tokenizer_config(legacy, model_max_length))
    special_map = {
        "bos_token": _released_added_token(BOS_TOKEN, with_type=False),
        "eos_token": _released_added_token(EOS_TOKEN, with_type=False),
        "pad_token": UNK_TOKEN,
        "unk_token": _released_added_token(UNK_TOKEN, with_type=False),
    }
    write_json(out_dir / "special_tokens_map.json", special_map)


def build_sentencepiece_tokenizer(out_dir: str | Path, cfg: TinyConfig | None = None, *, legacy: bool = False) -> bytes:
    """Train the tiny sentencepiece tokenizer on the built-in corpus and save it to `out_dir` in the released layout.

    Writes tokenizer.model, tokenizer_config.json (LlamaTokenizer, add_bos_token, `legacy`, right padding) and
    special_tokens_map.json; no tokenizer.json. Returns the serialized sentencepiece model.
    """
    cfg = cfg or TinyConfig()
    model = train_sentencepiece(tokenizer_corpus(), cfg.vocab_size)
    extra = [" two  spaces ", "\tTabs\nand newlines\n", "Unicode: é 猫 🐱", "digits 2024 and 3.14"]
    processor = _check_sentencepiece(model, [*tokenizer_corpus(), *extra])
    save_sentencepiece_tokenizer(model, out_dir, legacy, cfg.model_max_length)
    logger.info("sentencepiece tokenizer with %d pieces written to %s", processor.get_piece_size(), out_dir)
    return model
