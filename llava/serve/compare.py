"""One image, two chats: all visual tokens against VisionZip, with counts, time to first token and KV cache size.

The web demo's model side (:mod:`llava.serve.gradio_web` is only its page). Each chat is a
:class:`llava.serve.chat.ChatSession`: the image's visual tokens are made once and its keys and values are kept
between turns. The visual tokens are also cached per image (by the hash of its bytes) and budget, so a new chat on
the same image, or the same budget again, does not run the encoder.
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
from llava.serve.kept import default_budget, show_llava
from visionzip import VisionZipConfig

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

    def new_chat(self, image: Image.Image, key: str, cfg: VisionZipConfig | None) -> ChatSession:
        """A chat about ``image`` (its bytes' hash ``key``) with VisionZip ``cfg`` (None: all tokens), its visual
        tokens taken from the cache or made now, once for all its turns."""
        conv = get_conv_template(self.conv_mode)
        session = ChatSession(self.model, self.tokenizer, self.image_processor, conv, [image], self.context_len)
        with self.lock:
            features = self._tokens.get((key, cfg))
            if features is None:
                self.model.set_visionzip(cfg)
                with torch.inference_mode():
                    features = self.model.image_tokens(session.pixels, session.image_sizes)
                self._tokens.put((key, cfg), features)
        session.features = features
        session.tokens_after = sum(f.tokens.shape[0] for f in features)
        return session

    def ask(self, session: ChatSession, text: str) -> Turn:
        """One turn of ``session`` (greedy), with its counts and timings."""
        with self.lock:
            answer = session.ask(text, temperature=0.0, max_new_tokens=self.max_new_tokens)
        kv_tokens, kv_bytes = kv_cache_size(session.cache)
        return Turn(answer, session.tokens_after, session.tokens_before, session.last_ttft_ms, kv_tokens, kv_bytes)

    def picture(self, image: Image.Image, key: str, cfg: VisionZipConfig, dpi: int = 100) -> np.ndarray:
        """The kept-token picture (:func:`llava.serve.kept.show_llava`) as an (H, W, 4) uint8 array, cached."""
        cached = self._pictures.get((key, cfg))
        if cached is not None:
            return cached
        with self.lock:
            picture = show_llava(self.model, self.image_processor, image, cfg)
        picture.figure.set_dpi(dpi)
        canvas = FigureCanvasAgg(picture.figure)  # the figure has no pyplot canvas: render it with Agg here
        canvas.draw()
        pixels = np.asarray(canvas.buffer_rgba()).copy()
        self._pictures.put((key, cfg), pixels)
        return pixels
