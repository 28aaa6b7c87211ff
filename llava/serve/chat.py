"""A multi-turn chat about fixed images on one language-model cache (the chat CLI and the web demo use it).

The image goes through the vision tower (and VisionZip, or a selection) once, on the first turn; its visual tokens are
kept (CDPruner's, chosen for the first question, are chosen again for each question with ``multiturn="reprefill"``), and
so are the keys and values of the conversation so far (a transformers ``DynamicCache``). Each later turn re-renders
the whole conversation with the template, keeps the cache for the longest prefix of tokens it already holds, and
runs the language model on the rest only (the template's text between the previous answer and the new assistant
prompt). Decoding is a plain loop (greedy at temperature 0, else sampling with optional top-p). The time to first
token is measured inside that loop: from the start of the turn to the first sampled token (on the first turn it
includes encoding the image).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import Conversation
from llava.inference import build_query, prepare_images, stop_string, uncompressed_token_count
from llava.mm_utils import tokenizer_image_token
from llava.model.input_builder import ImageTokens, sample_image_ids, sample_positions, splice_sample
from visionzip.baselines.select import needs_text
from visionzip.methods import MULTITURN_MODES

logger = logging.getLogger(__name__)


def next_token(
    logits: torch.Tensor, temperature: float, top_p: float | None, generator: torch.Generator | None = None
) -> int:
    """Pick the next token from logits (V,): argmax at temperature 0, else a sample (nucleus ``top_p`` if given)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens after the nucleus is full
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading ids two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation about fixed images: visual tokens computed once, keys/values kept between turns.

    Attributes:
        tokens_before: visual tokens the model would give without VisionZip (all images).
        tokens_after: visual tokens the language model receives (after VisionZip when on); None before turn 1.
        last_ttft_ms: time to first token of the last turn.
        last_first_logits: (V,) the logits that chose the last turn's first token.
        layer_average: after a prefill an in-LLM method pruned, its achieved average of visual tokens over the
            decoder layers (over their inputs, over their outputs); None without one.
        instruction: the question the images' tokens were last made for (what CDPruner selected for); None before.
    """

    def __init__(
        self, model: Any, tokenizer: Any, image_processor: Any, conv: Conversation, images: Sequence[Image.Image],
        context_len: int | None = None, multiturn: str = "cache",
    ) -> None:  # fmt: skip
        if multiturn not in MULTITURN_MODES:
            raise ValueError(f"multiturn must be one of {MULTITURN_MODES}, got {multiturn!r}")
        self.model, self.tokenizer, self.conv, self.multiturn = model, tokenizer, conv, multiturn
        self.num_images = len(images)
        self.pixels, self.image_sizes = prepare_images(images, image_processor, model)
        self.context_len = context_len
        self.stop_str = stop_string(conv)
        self.features: list[ImageTokens] | None = None  # one per image (tokens and positions), made on turn 1
        self.cache = DynamicCache(config=model.config)
        self.cached_ids: list[int] = []  # prompt ids (image placeholders included) whose keys/values are cached
        self.turns = 0
        self.tokens_before = uncompressed_token_count(model, self.pixels, self.image_sizes)
        self.tokens_after: int | None = None
        self.last_ttft_ms: float | None = None
        self.last_first_logits: torch.Tensor | None = None
        self.layer_average: tuple[float, float] | None = None
        self.instruction: str | None = None

    def _embedded_length(self, ids: Sequence[int], positions: bool = False) -> int:
        """Tokens ``ids`` give the language model once each placeholder is its image's tokens; ``positions``: the
        position ids they advance by instead (an image's vanilla count with VisionZip's original positions)."""
        length, image = 0, 0
        for token in ids:
            if token == IMAGE_TOKEN_INDEX:
                features = self.features[image]
                length += features.length if positions else features.tokens.shape[0]
            else:
                length += 1
            image += token == IMAGE_TOKEN_INDEX
        return length

    def _new_input(self, ids: list[int]) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
        """Keep the cache for the longest prefix it shares with ``ids``; embed the rest.

        Returns:
            embeddings (1, T, C) of the ids not yet in the cache, those ids (T' <= T, placeholders counted once),
            their position ids (1, T), continuing the kept prefix's, and the image of each token (1, T) (-1: text).
        """
        keep = min(common_prefix_length(self.cached_ids, ids), len(ids) - 1)  # at least one position to run
        kept, new = ids[:keep], ids[keep:]
        self.cache.crop(self._embedded_length(kept) - self.cache.get_seq_length())  # <= 0: positions to drop
        self.cached_ids = kept
        first_image, count = kept.count(IMAGE_TOKEN_INDEX), new.count(IMAGE_TOKEN_INDEX)
        if first_image + count > self.num_images:
            raise ValueError(f"the conversation holds more image tokens than its {self.num_images} image(s)")
        segment = torch.tensor(new, device=self.model.device)
        labels = torch.full_like(segment, IGNORE_INDEX)
        images = self.features[first_image : first_image + count]
        embeds, _ = splice_sample(segment, labels, images, self.model.get_input_embeddings())
        positions = sample_positions(segment, images, start=self._embedded_length(kept, positions=True))
        return embeds[None], new, positions[None], sample_image_ids(segment, images)[None]

    def _step(
        self, inputs_embeds: torch.Tensor, ids: list[int], positions: torch.Tensor, image_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Run (1, T, C) new tokens at position ids (1, T) through the language model on the cache -> logits (V,).
        ``image_ids`` (1, T) go to a method that prunes inside the language model, when one is set."""
        extra = self.model.pruning_inputs(image_ids)
        out = self.model(
            inputs_embeds=inputs_embeds, position_ids=positions, past_key_values=self.cache, use_cache=True,
            logits_to_keep=1, **extra,
        )  # fmt: skip
        if extra:  # this call pruned inside the language model: what it achieved, for this chat's summaries
            self.layer_average = self.model.get_model().pruning_report()[0]
        self.cached_ids.extend(ids)
        return out.logits[0, -1]

    def _decode(
        self, inputs: tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor], start: float, temperature: float,
        top_p: float | None, max_new_tokens: int, generator: torch.Generator | None,
    ) -> list[int]:  # fmt: skip
        """The answer's ids, stopping at EOS, the template's stop string, max_new_tokens or the context length.
        ``inputs``: the turn's new input (:meth:`_new_input`)."""
        inputs_embeds, ids, positions, image_ids = inputs
        generated: list[int] = []
        embed = self.model.get_input_embeddings()
        for step in range(max_new_tokens):
            logits = self._step(inputs_embeds, ids, positions, image_ids if step == 0 else None)
            if step == 0:
                self.last_first_logits = logits
            token = next_token(logits, temperature, top_p, generator)
            if step == 0:
                self.last_ttft_ms = (time.perf_counter() - start) * 1000.0
            if token == self.tokenizer.eos_token_id:
                break
            generated.append(token)
            if self.stop_str and self.stop_str in self.tokenizer.decode(generated, skip_special_tokens=True):
                break
            positions = positions[:, -1:] + 1
            used = max(self.cache.get_seq_length(), int(positions))  # tokens held, or the next position id
            if self.context_len is not None and used + 1 >= self.context_len:
                logger.warning("the conversation reached the context length (%d tokens)", self.context_len)
                break
            ids = [token]
            inputs_embeds = embed(torch.tensor([ids], device=self.model.device))
        return generated

    def _encode_images(self, question: str) -> None:
        """Vision tower (+ VisionZip or a selection) and projector, once for the whole conversation; ``question``
        is the instruction a text-conditioned selection (CDPruner) chooses each image's tokens for."""
        instructions = [question] * self.num_images  # the one row's question, for each of its images
        self.features = self.model.image_tokens(self.pixels, self.image_sizes, instructions)
        self.instruction = question
        self.tokens_after = sum(f.tokens.shape[0] for f in self.features)

    def _selects_by_text(self) -> bool:
        """Whether the model's selection reads the question (CDPruner): "reprefill" then chooses again each turn."""
        selection = self.model.config.selection_config()
        return selection is not None and needs_text(selection)

    @torch.inference_mode()
    def ask(
        self, text: str, temperature: float = 0.0, top_p: float | None = None, max_new_tokens: int = 512,
        generator: torch.Generator | None = None, answer: str | None = None, instruction: str | None = None,
    ) -> str:  # fmt: skip
        """Answer one user turn; the answer joins the conversation for the next turn. ``answer`` given (a turn
        answered by its ground truth, as in ``eval.multiturn``): nothing is decoded; in ``cache`` mode the turn's
        prompt is prefilled as when answering it (a method chooses from it) and the answer is read with the next
        turn. ``instruction``: what a text-conditioned selection reads for this turn (None: ``text``; lmms-eval
        passes the question without the benchmark's answer-format suffix)."""
        start = time.perf_counter()
        if self.features is None or (self.multiturn == "reprefill" and self._selects_by_text()):
            self._encode_images(text if instruction is None else instruction)  # "cache": CDPruner keeps turn 1's
        if self.turns == 0:
            text = build_query(text, self.num_images, self.model.config)
        self.conv.append_message(self.conv.roles[0], text)
        self.conv.append_message(self.conv.roles[1], None)
        ids = tokenizer_image_token(self.conv.get_prompt(), self.tokenizer, IMAGE_TOKEN_INDEX)
        length = max(self._embedded_length(ids), self._embedded_length(ids, positions=True))
        if self.context_len is not None and length >= self.context_len:
            del self.conv.messages[-2:]  # the session stays usable with a shorter question
            raise ValueError(f"the conversation no longer fits the context length ({self.context_len} tokens)")
        if self.multiturn == "reprefill":  # the whole conversation again: the method re-selects for this turn
            self.cache, self.cached_ids = DynamicCache(config=self.model.config), []
        if answer is not None:
            if self.multiturn == "cache":
                self._step(*self._new_input(ids))
        else:
            generated = self._decode(self._new_input(ids), start, temperature, top_p, max_new_tokens, generator)
            answer = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
            if self.stop_str:
                answer = answer.removesuffix(self.stop_str).strip()
        self.conv.messages[-1][-1] = answer
        self.turns += 1
        return answer
