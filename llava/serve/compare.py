"""One image, two chats: all visual tokens against a method (VisionZip, DivPrune, VisPruner, CDPruner, or one that
prunes inside the language model), with counts, time to first token and KV cache size.

The web demo's model side (:mod:`llava.serve.gradio_web` is only its page). Each chat is a
:class:`llava.serve.chat.ChatSession`: the image's visual tokens are made once and its keys and values are kept
between turns. The visual tokens are also cached per image (by the hash of its bytes) and budget, so a new chat on
the same image, or the same budget again, does not run the encoder (CDPruner's depend on the question: its chat makes
them on its first turn, and again each turn with ``multiturn="reprefill"``). The model is shared: each call sets the
chat's own method on it (one at a time) and turns it off after.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image, UnidentifiedImageError
from transformers import DynamicCache

from llava.conversation import get_conv_template
from llava.inference import default_conv_mode
from llava.serve.chat import ChatSession
from llava.serve.kept import default_budget, show_llava, show_methods
from visionzip import VisionZipConfig
from visionzip.baselines.select import needs_text
from visionzip.methods import SELECTION_METHODS, MethodConfig, build_method, method_name, parse_option

CACHE_ENTRIES = 8  # images x budgets whose visual tokens (and pictures) are kept


def read_image(path: str | Path) -> tuple[Image.Image, str]:
    """An uploaded file as an RGB image and the SHA-256 of its bytes; ValueError, for the page, if it is none."""
    data = Path(path).read_bytes()
    try:
        with Image.open(Path(path)) as opened:
            image = opened.convert("RGB")  # decodes every pixel: a truncated or corrupt file fails here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{Path(path).name} is not an image that can be read ({type(err).__name__}: {err})") from err
    return image, hashlib.sha256(data).hexdigest()


def kv_cache_size(cache: DynamicCache) -> tuple[int, int]:
    """(tokens, bytes) held by a transformers cache: its sequence length, and its keys' and values' bytes."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return cache.get_seq_length(), total


@dataclass
class Turn:
    """One side's answer to one question, and what it cost."""

    answer: str
    visual_tokens: int  # tokens the language model received for the image
    tokens_before: int  # tokens the image gives without VisionZip
    ttft_ms: float
    kv_tokens: int
    kv_bytes: int
    layer_average: tuple[float, float] | None = None  # an in-LLM method's achieved average over the decoder layers


class _LRU:
    """A small least-recently-used dict."""

    def __init__(self, size: int) -> None:
        self.size, self.items = size, OrderedDict()

    def get(self, key: Hashable) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
        return self.items.get(key)

    def put(self, key: Hashable, value: Any) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


class CompareBackend:
    """A loaded LLaVA shared by every chat of the demo; one request runs on it at a time.

    Attributes:
        encoder_runs: how often the vision encoder has run (a forward pre-hook on its patch embedding counts them).
    """

    def __init__(self, tokenizer: Any, model: Any, image_processor: Any, context_len: int, conv_mode: str | None = None,
                 max_new_tokens: int = 64) -> None:  # fmt: skip
        self.tokenizer, self.model, self.image_processor = tokenizer, model, image_processor
        self.context_len, self.max_new_tokens = context_len, max_new_tokens
        self.conv_mode = conv_mode or default_conv_mode(model.config)
        self.lock = threading.Lock()
        self._tokens, self._pictures = _LRU(CACHE_ENTRIES), _LRU(CACHE_ENTRIES)
        self.encoder_runs = 0
        patch_embedding = model.get_vision_tower().vision_tower.get_input_embeddings()  # runs once per encoder pass
        patch_embedding.register_forward_pre_hook(self._count_run)

    def _count_run(self, *_: Any) -> None:
        self.encoder_runs += 1

    @property
    def patches(self) -> int:
        """Encoder tokens per view (patches and [CLS])."""
        return self.model.get_vision_tower().num_tokens

    def default_budget(self) -> VisionZipConfig:
        """The checkpoint's saved budget, else the paper's proportion (:func:`llava.serve.kept.default_budget`)."""
        saved = self.model.config.visionzip_config()
        tower = self.model.get_vision_tower()
        return saved or dataclasses.replace(default_budget(tower.num_patches_per_side**2), layer=tower.select_layer)

    def budget(self, dominant: int, contextual: int) -> VisionZipConfig:
        """The default budget's options with these counts; ValueError if they do not fit a view."""
        cfg = dataclasses.replace(self.default_budget(), dominant=int(dominant), contextual=int(contextual))
        cfg.check_fits(self.patches)
        return cfg

    def method(self, name: str, dominant: int, contextual: int, options: str = "") -> MethodConfig:
        """The right-hand chat's method: VisionZip at the sliders' counts, or ``name`` (a selection or an in-LLM method)
        with ``options`` ("budget=32, important_ratio=0.75", "layer=1, budget=40"), checked against the model;
        ValueError, for the page, with the reason."""
        if name == "visionzip":
            if options.strip():
                raise ValueError(
                    "VisionZip takes its counts from the sliders; the options box is for the other methods"
                )
            return self.budget(dominant, contextual)
        given = dict(item.split("=", 1) for item in options.replace(",", " ").split() if "=" in item)
        if len(given) != len(options.replace(",", " ").split()):
            raise ValueError(f"method options are key=value pairs (e.g. layer=1, budget=40), got {options!r}")
        budget = float(given.pop("budget")) if "budget" in given else None
        cfg = build_method(name, budget, **{key: parse_option(name, key, value) for key, value in given.items()})
        with self.lock:
            try:
                self._use_method(cfg)  # the model's own check (layers, the image's tokens, a view's patches)
            finally:
                self._use_method(None)
        return cfg

    def _use_method(self, cfg: MethodConfig | None) -> None:
        """Set ``cfg`` on the shared model, every other method off first (one method at a time); None: all off."""
        self.model.set_pruning(None)
        self.model.set_selection(None)
        self.model.set_visionzip(None)
        name = method_name(cfg)
        if name == "visionzip":
            self.model.set_visionzip(cfg)
        elif name in SELECTION_METHODS:
            self.model.set_selection(cfg)
        elif cfg is not None:
            self.model.set_pruning(cfg)

    def new_chat(
        self, image: Image.Image, key: str, cfg: MethodConfig | None, multiturn: str = "cache"
    ) -> ChatSession:  # fmt: skip
        """A chat about ``image`` (its bytes' hash ``key``) with ``cfg`` (None: all tokens), its visual tokens taken
        from the cache or made now, once for all its turns (an in-LLM method gets every token and prunes inside;
        CDPruner's are made for the chat's first question, when it comes)."""
        conv = get_conv_template(self.conv_mode)
        session = ChatSession(
            self.model, self.tokenizer, self.image_processor, conv, [image], self.context_len, multiturn
        )  # fmt: skip
        name = method_name(cfg)
        if name in SELECTION_METHODS and needs_text(cfg):
            return session
        encoder_cfg = cfg if name == "visionzip" or name in SELECTION_METHODS else None
        with self.lock:
            features = self._tokens.get((key, encoder_cfg))
            if features is None:
                try:
                    self._use_method(encoder_cfg)
                    with torch.inference_mode():
                        features = self.model.image_tokens(session.pixels, session.image_sizes)
                finally:
                    self._use_method(None)
                self._tokens.put((key, encoder_cfg), features)
        session.features = features
        session.tokens_after = sum(f.tokens.shape[0] for f in features)
        return session

    def ask(self, session: ChatSession, text: str, method: MethodConfig | None = None) -> Turn:
        """One turn of ``session`` (greedy), with its counts and timings; ``method``: the chat's own (what
        :meth:`new_chat` was given), set on the model for this turn."""
        with self.lock:
            try:
                self._use_method(method)
                answer = session.ask(text, temperature=0.0, max_new_tokens=self.max_new_tokens)
            finally:
                self._use_method(None)
        kv_tokens, kv_bytes = kv_cache_size(session.cache)
        return Turn(answer, session.tokens_after, session.tokens_before, session.last_ttft_ms, kv_tokens, kv_bytes,
                    session.layer_average)  # fmt: skip

    def picture(
        self, image: Image.Image, key: str, cfg: MethodConfig, instruction: str | None = None, dpi: int = 100
    ) -> np.ndarray:  # fmt: skip
        """The kept-token picture as an (H, W, 4) uint8 array, cached: VisionZip's (:func:`llava.serve.kept.show_llava`)
        or a selection's kept patches (:func:`llava.serve.kept.show_methods`; CDPruner's for ``instruction``)."""
        instruction = instruction if method_name(cfg) in SELECTION_METHODS and needs_text(cfg) else None
        cached = self._pictures.get((key, cfg, instruction))
        if cached is not None:
            return cached
        with self.lock:
            try:
                if isinstance(cfg, VisionZipConfig):
                    picture = show_llava(self.model, self.image_processor, image, cfg)
                else:
                    picture = show_methods(self.model, self.image_processor, image, [cfg], instruction)
            finally:
                self._use_method(None)
        picture.figure.set_dpi(dpi)
        canvas = FigureCanvasAgg(picture.figure)  # the figure has no pyplot canvas: render it with Agg here
        canvas.draw()
        pixels = np.asarray(canvas.buffer_rgba()).copy()
        self._pictures.put((key, cfg, instruction), pixels)
        return pixels
