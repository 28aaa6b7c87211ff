"""load_tokenizer: a checkpoint's tokenizer, with Llama's sentencepiece tokenizers splitting text as LLaVA's did."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SENTENCEPIECE_FILE = "tokenizer.model"
FAST_FILE = "tokenizer.json"
SPIECE_UNDERLINE = "▁"  # sentencepiece's whitespace symbol
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")  # as tokenizer_config.json names them
PROTOBUF_MODULE = "sentencepiece.sentencepiece_model_pb2"
# sentencepiece 0.2.0's generated protobuf module loads with protobuf 6 and 7; 0.2.1+ needs protobuf >= 7.36,
# which lmms-eval's wandb==0.25.0 (protobuf < 7) rules out.
SENTENCEPIECE_PIN = "sentencepiece==0.2.0"


def _import_protobuf_module() -> Any:
    """sentencepiece's generated protobuf module, which transformers uses to read a ``tokenizer.model``."""
    return importlib.import_module(PROTOBUF_MODULE)


def _protobuf_errors() -> tuple[type[Exception], ...]:
    """What importing a generated protobuf module raises when it does not fit the installed protobuf runtime."""
    try:
        from google.protobuf.runtime_version import VersionError
    except ImportError:  # protobuf < 5.26 (no runtime check: a newer module fails to import instead) or none
        return (ImportError,)
    return (ImportError, VersionError)


def _installed(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def require_sentencepiece(folder: str | Path) -> None:
    """Raise ImportError, saying what to install, unless a sentencepiece ``tokenizer.model`` can be read here.

    transformers converts such a file through sentencepiece's protobuf module; when that module does not import
    it falls back to a tiktoken reader whose error ("Error parsing line ... tokenizer.model") names neither.
    """
    try:
        _import_protobuf_module()
    except _protobuf_errors() as err:
        raise ImportError(
            f"{folder} holds a sentencepiece tokenizer ({SENTENCEPIECE_FILE}, no {FAST_FILE}); reading it needs "
            f"sentencepiece's protobuf module ({PROTOBUF_MODULE}), which failed to import: {err}. Installed: "
            f"sentencepiece {_installed('sentencepiece')}, protobuf {_installed('protobuf')}. Install "
            f"{SENTENCEPIECE_PIN}, whose module works with protobuf 6 and 7: pip install '{SENTENCEPIECE_PIN}' "
            "(or run scripts/setup.sh)"
        ) from err


def match_slow_llama(tokenizer: LlamaTokenizer) -> None:
    """Make transformers 5's Llama tokenizer split text as transformers 4's sentencepiece ``LlamaTokenizer`` did.

    LLaVA loaded its tokenizers with ``use_fast=False``: every run of text between special tokens was encoded by
    sentencepiece, with ``legacy=True`` as sentencepiece encodes it alone (a "▁" prepended), with ``legacy=False``
    with a "▁" at the start of the input only (none after a special token such as ``</s>``). transformers 5 has
    only the tokenizers backend, whose Metaspace skips its "▁" when the text already starts with a space: " with"
    gave "▁", "▁with" and gives "▁with". This sets the backend so that the ids are sentencepiece's again:
    legacy: prepend "▁" to each run (normalizer), spaces to "▁" (pre-tokenizer); otherwise: the normalizer sees
    the whole input (special tokens matched after it) and adds a "▁" before a leading space, and Metaspace adds
    the "▁" of an input that starts with text. A tokenizer that adds no prefix space is left as it is.
    """
    # save_pretrained writes the keys of init_kwargs, where transformers 5.23 keeps no `legacy`: without this a
    # saved legacy tokenizer (a full fine-tune's output) would reload as legacy=False
    tokenizer.init_kwargs["legacy"] = tokenizer.legacy
    if tokenizer.add_prefix_space is False:  # None is transformers' default, True
        return
    backend = tokenizer.backend_tokenizer
    if tokenizer.legacy:
        backend.normalizer = normalizers.Prepend(SPIECE_UNDERLINE)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(SPIECE_UNDERLINE, prepend_scheme="never", split=False)
        return
    backend.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(SPIECE_UNDERLINE, " "),  # as the slow tokenizer read a literal "▁"
            normalizers.Replace(Regex(r"\A "), SPIECE_UNDERLINE + " "),
        ]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(SPIECE_UNDERLINE, prepend_scheme="first", split=False)
    specials = [t for t in tokenizer.added_tokens_decoder.values() if t.special]
    flags = [{"single_word": t.single_word, "lstrip": t.lstrip, "rstrip": t.rstrip} for t in specials]
    backend.add_special_tokens(
        [AddedToken(t.content, **f, normalized=True, special=True) for t, f in zip(specials, flags, strict=True)]
    )


def declared_class(folder: str | Path) -> str | None:
    """The ``tokenizer_class`` a folder's tokenizer_config.json names, if any."""
    path = Path(folder) / "tokenizer_config.json"
    return json.loads(path.read_text()).get("tokenizer_class") if path.is_file() else None


def load_tokenizer(path: str | Path, **kwargs: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint or LLM folder, tokenizing as LLaVA's code did with it.

    A folder with only a sentencepiece ``tokenizer.model`` (the released LLaVA and Vicuna checkpoints) needs
    sentencepiece's protobuf module: checked first, with an error that says what to install. Such a folder that
    declares a Llama tokenizer is read as one: ``AutoTokenizer`` picks by config.json's ``model_type``, and for
    ``"llava"`` (LLaVA-1.5's) builds a generic backend without Llama's "▁" prefix ("USER" -> "US", "ER").
    Llama tokenizers then split text exactly as the slow tokenizer LLaVA used (``match_slow_llama``); a
    tokenizer_config.json without ``legacy`` reads as transformers 5 reads it (``legacy=False``).
    ``kwargs`` go to ``from_pretrained``.
    """
    folder = Path(path)
    sentencepiece_only = (folder / SENTENCEPIECE_FILE).is_file() and not (folder / FAST_FILE).is_file()
    if sentencepiece_only:
        require_sentencepiece(folder)
    if sentencepiece_only and declared_class(folder) in LLAMA_CLASSES:
        tokenizer = LlamaTokenizer.from_pretrained(str(path), **kwargs)
    else:
        if declared_class(folder) is not None:
            # The tokenizer's own files name its class. Without a config AutoTokenizer reads config.json only to
            # choose one, by model_type (wrong for LLaVA-1.5's "llava"), and warns on its legacy rope_scaling key.
            kwargs.setdefault("config", PreTrainedConfig())
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if isinstance(tokenizer, LlamaTokenizer):
        match_slow_llama(tokenizer)
    return tokenizer
