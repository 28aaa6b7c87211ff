"""Batched answers and log-likelihoods from our LLaVA (with or without VisionZip); no lmms-eval import.

The lmms-eval model ``llava_visionzip`` (``eval.llava_visionzip``) is a thin adapter around :class:`LlavaRunner`,
which calls the same ``load_pretrained_model``, templates, image preprocessing and ``generate`` as
``llava.eval.run_llava`` (through :mod:`llava.inference`): one path, many callers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from eval.instructions import instructions_for
from eval.options import ModelOptions
from eval.visual_tokens import VisualTokenTally, prefill_lengths, visual_counts
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.inference import (
    build_prompt,
    build_query,
    default_conv_mode,
    generation_kwargs,
    prepare_images,
    stop_string,
)
from llava.mm_utils import KeywordsStoppingCriteria, tokenizer_image_token
from llava.model.builder import load_pretrained_model, use_visionzip
from visionzip.baselines.prune import config_from_dict
from visionzip.baselines.select import needs_text

logger = logging.getLogger(__name__)

Visuals = Sequence[Image.Image]  # the images of one request, in the order their <image> tokens appear
# Keys of a task's generation_kwargs that only the decoding settings below use, or that LLaVA's config decides.
_SAMPLING_KEYS = ("temperature", "top_p", "num_beams", "do_sample")
_IGNORED_KEYS = ("image_aspect_ratio",)  # lmms-eval's llava reads it only when the config lacks one; ours has it


@dataclass
class GenerationSettings:
    """Keyword arguments for ``model.generate`` and the strings that end an answer."""

    kwargs: dict[str, Any]
    stops: list[str] = field(default_factory=list)


def generation_settings(task_kwargs: dict[str, Any], greedy: bool, default_max_new_tokens: int) -> GenerationSettings:
    """A task's ``generation_kwargs`` -> ``generate`` options (greedy unless ``greedy`` is False) and stop strings.

    ``until`` (str or list) becomes the stop strings; ``max_new_tokens`` is kept; sampling keys are followed only
    with ``greedy=False`` (then ``do_sample: true`` or a temperature > 0 samples). Unknown keys are an error.
    """
    task_kwargs = dict(task_kwargs)
    until = task_kwargs.pop("until", None) or []
    stops = [until] if isinstance(until, str) else list(until)
    if not all(isinstance(s, str) for s in stops):
        raise ValueError(f"generation_kwargs until must be a string or a list of strings, got {until!r}")
    max_new = int(task_kwargs.pop("max_new_tokens", default_max_new_tokens))
    sampling = {key: task_kwargs.pop(key) for key in _SAMPLING_KEYS if key in task_kwargs}
    for key in _IGNORED_KEYS:
        if task_kwargs.pop(key, None) is not None:
            logger.debug("generation_kwargs %s ignored: the checkpoint's config sets the preprocessing", key)
    if task_kwargs:
        raise ValueError(f"unsupported generation_kwargs {sorted(task_kwargs)} for llava_visionzip")
    temperature = float(sampling.get("temperature") or 0.0)
    if sampling.get("do_sample") and temperature == 0:
        temperature = 1.0
    if greedy:
        temperature = 0.0
    top_p = sampling.get("top_p")
    beams = int(sampling.get("num_beams") or 1)
    kwargs = generation_kwargs(temperature, float(top_p) if top_p is not None else None, beams, max_new)
    return GenerationSettings(kwargs, [s for s in stops if s])


@dataclass(frozen=True)
class ContinuationScore:
    """How likely a continuation is as the assistant's reply.

    Attributes:
        log_prob: sum of log p over the scored tokens (the reply's, then the template's end of turn).
        num_tokens: how many tokens were scored.
        greedy: whether greedy decoding gives every scored token.
    """

    log_prob: float
    num_tokens: int
    greedy: bool

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per scored token: what lmms-eval's ``llava`` model returns (and ranks by)."""
        return -self.log_prob / self.num_tokens


def score_tokens(logits: torch.Tensor, targets: torch.Tensor) -> ContinuationScore:
    """Score the targets that are not ``IGNORE_INDEX``.

    Args:
        logits: (T, V) predictions, row t for ``targets[t]``.
        targets: (T,) token ids, ``IGNORE_INDEX`` where not scored (prompt, image, padding).
    """
    scored = targets != IGNORE_INDEX  # (T,)
    log_probs = torch.log_softmax(logits[scored].float(), dim=-1)  # (S, V)
    tokens = targets[scored]  # (S,)
    total = log_probs.gather(-1, tokens[:, None]).sum().item()
    return ContinuationScore(float(total), int(tokens.shape[0]), bool((log_probs.argmax(-1) == tokens).all()))


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string, stripped."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


def pad_right(sequences: Sequence[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id tensors -> (B, L) padded on the right with ``value``, and the (B, L) attention mask."""
    longest = max(s.shape[0] for s in sequences)
    ids = torch.full((len(sequences), longest), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : seq.shape[0]], mask[i, : seq.shape[0]] = seq, 1
    return ids, mask


def pruning_tally(model: Any, nominal: float | None = None, multiturn: str = "cache") -> VisualTokenTally | None:
    """A tally for the in-LLM method ``model.config.token_pruning`` names, or for the selection
    ``config.token_selection`` names (its kept tokens; ``nominal``: None takes its tokens per view); None when neither
    is on."""
    saved = getattr(model.config, "token_pruning", None)
    if saved:
        return VisualTokenTally(config_from_dict(saved).name, dict(saved), nominal, multiturn)
    selection = model.config.selection_config()
    if selection is None:
        return None
    nominal = float(selection.tokens) if nominal is None else nominal
    return VisualTokenTally(selection.name, selection.to_dict(), nominal, multiturn, kind="kept")


def use_method(model: Any, options: ModelOptions) -> None:
    """Set the method ``options`` names: an in-LLM method or a selection (``method=visionzip`` turns a saved one off;
    no ``method`` keeps the checkpoint's); a model that cannot run it is refused naming the model args. VisionZip is
    already set (off for either)."""
    if options.method is None:
        return
    try:
        model.set_pruning(options.requested_pruning())
        if options.selection_method is not None:
            model.set_selection(options.requested_selection())
    except ValueError as err:
        raise ValueError(f"model_args method={options.method} on {options.pretrained}: {err}") from err


class LlavaRunner:
    """A loaded LLaVA (VisionZip, an in-LLM method, or neither) answering batches of (context, images) requests.

    With an in-LLM method on (``config.token_pruning``), :attr:`tally` collects the achieved layer-average of visual
    tokens of every prefill (:mod:`eval.visual_tokens`).

    Args:
        tokenizer, model, image_processor: as ``load_pretrained_model`` returns them.
        conv_template: chat template name; None picks the backbone's.
        greedy: decode greedily whatever the task asks.
        max_new_tokens: used when a task sets none.
    """

    def __init__(
        self, tokenizer: Any, model: Any, image_processor: Any, conv_template: str | None = None,
        greedy: bool = True, max_new_tokens: int = 1024,
    ) -> None:  # fmt: skip
        self.tokenizer, self.model, self.image_processor = tokenizer, model, image_processor
        self.conv_template = conv_template or default_conv_mode(model.config)
        get_conv_template(self.conv_template)  # fail now on an unknown name
        self.greedy, self.max_new_tokens = greedy, max_new_tokens
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        self.tally = pruning_tally(model)

    @classmethod
    def load(cls, options: ModelOptions, device: str) -> LlavaRunner:
        """``load_pretrained_model`` on ``device`` with the options' VisionZip stage (else the checkpoint's), dtype
        and template."""
        if options.clip_text is not None:
            raise ValueError(
                f"model_args clip_text={options.clip_text}: our LLaVA reads CDPruner's text tower from the CLIP "
                "checkpoint its mm_vision_tower names; clip_text is for transformers' classes (llava_hf_visionzip)"
            )
        tokenizer, model, image_processor, _ = load_pretrained_model(
            options.pretrained, options.model_base, device=device, attn_implementation=options.attn_implementation,
            dtype=options.torch_dtype,
        )  # fmt: skip
        requested = options.requested_visionzip(model.get_vision_tower().select_layer, model.config.visionzip_config())
        off = options.visionzip == "off" or (options.other_method is not None and requested is None)
        if options.method is not None:  # only the method named: a saved selection goes before VisionZip is set
            model.set_selection(None)
        choice = use_visionzip(model, requested, options.visionzip_budget, off=off)
        use_method(model, options)
        runner = cls(tokenizer, model, image_processor, options.conv_template, options.greedy, options.max_new_tokens)
        runner.tally = pruning_tally(model, options.nominal_budget(), options.multiturn)
        method = "no other method" if runner.tally is None else f"{runner.tally.method} {runner.tally.config}"
        logger.info("llava_visionzip: %s on %s, %s, %s", options.pretrained, device, choice.describe(), method)
        return runner

    def record_prefill(self, rows: int, with_images: bool, kept: list[int | None] | None = None) -> None:
        """Add the last prefill's achieved layer-averages (``rows`` requests) to :attr:`tally`, if a method is on; a
        selection's ``kept``: the visual tokens each row gave the language model (None: a row without an image)."""
        if self.tally is None:
            return
        if self.tally.kind == "kept":
            self.tally.add([None if k is None else (float(k), float(k)) for k in (kept or [None] * rows)])
            return
        self.tally.add(self.model.get_model().pruning_report() if with_images else [None] * rows)

    def instruction_kwargs(self, contexts: Sequence[str]) -> dict[str, list[str]]:
        """``{"instructions": [...]}``, one per request (its question without the answer-format suffix), where the
        selection reads them (CDPruner); else nothing."""
        selection = self.model.config.selection_config()
        if selection is None or not needs_text(selection):
            return {}
        return {"instructions": instructions_for(contexts)}

    def prompt(self, context: str, num_images: int) -> str:
        """The template's prompt for one user turn: ``<image>`` tokens put in front unless the context has them."""
        conv = get_conv_template(self.conv_template)
        return build_prompt(conv, build_query(context, num_images, self.model.config))

    def _images(self, visuals: Sequence[Visuals]) -> tuple[Any, list[tuple[int, int]] | None]:
        """All requests' images, flattened in reading order -> (pixels or None, sizes or None)."""
        flat = [image for images in visuals for image in images]
        for image in flat:
            if not isinstance(image, Image.Image):
                raise ValueError(f"llava_visionzip takes PIL images; got {type(image).__name__} (video/audio?)")
        if not flat:
            return None, None
        return prepare_images([image.convert("RGB") for image in flat], self.image_processor, self.model)

    def _encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        return [tokenizer_image_token(p, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt") for p in prompts]

    @torch.inference_mode()
    def generate(self, contexts: Sequence[str], visuals: Sequence[Visuals], task_kwargs: dict) -> list[str]:
        """One answer per (context, images), decoded together as one left-padded batch.

        Args:
            contexts: the task's question texts (``<image>`` tokens optional).
            visuals: the images of each request (may be empty).
            task_kwargs: the task's ``generation_kwargs`` (shared by the batch).
        """
        settings = generation_settings(task_kwargs, self.greedy, self.max_new_tokens)
        stops = [*settings.stops, stop_string(get_conv_template(self.conv_template))]
        prompts = [self.prompt(c, len(v)) for c, v in zip(contexts, visuals, strict=True)]
        input_ids, mask = pad_right(self._encode(prompts), 0)
        pixels, sizes = self._images(visuals)
        device = self.model.device
        # generate on embeddings hands the stopping criteria only the new tokens: they start at column 0
        criteria = [KeywordsStoppingCriteria([s for s in stops if s], self.tokenizer)]
        with prefill_lengths(self.model.get_model()) as lengths:  # what the language model received, row by row
            output = self.model.generate(
                input_ids.to(device), attention_mask=mask.to(device), images=pixels, image_sizes=sizes,
                pad_token_id=self.pad_id, stopping_criteria=criteria, **self.instruction_kwargs(contexts),
                **settings.kwargs,
            )  # fmt: skip
        kept = visual_counts(input_ids, mask, lengths[0]) if lengths else None
        self.record_prefill(len(contexts), pixels is not None, kept)
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [cut_at_stops(text, stops) for text in texts]

    def scoring_prompts(self, context: str, continuation: str, num_images: int) -> tuple[str, str]:
        """(the prompt up to the open assistant turn, the same conversation with ``continuation`` as the reply).

        The template renders the reply, so it ends with the template's end of turn (``</s>`` for vicuna_v1 and
        mistral_instruct), as in lmms-eval's ``llava`` model.
        """
        conv = get_conv_template(self.conv_template)
        conv.append_message(conv.roles[0], build_query(context, num_images, self.model.config))
        conv.append_message(conv.roles[1], continuation)
        return self.prompt(context, num_images), conv.get_prompt()

    def _scoring_ids(self, context: str, continuation: str, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (L,), labels (L,)) of the answered conversation; labels keep the tokens past the open prompt's length.

        Tokens are counted by position, as lmms-eval's ``llava`` counts them: the open prompt's token count marks
        where the reply starts in the answered conversation's tokens.
        """
        open_ids, ids = self._encode(self.scoring_prompts(context, continuation, num_images))
        start = open_ids.shape[0]
        if ids.shape[0] <= start:
            raise ValueError(f"continuation {continuation!r} adds no token to the prompt: expected a non-empty reply")
        labels = ids.clone()
        labels[:start] = IGNORE_INDEX
        return ids, labels

    @torch.inference_mode()
    def loglikelihood(
        self, contexts: Sequence[str], continuations: Sequence[str], visuals: Sequence[Visuals]
    ) -> list[ContinuationScore]:
        """How likely each continuation is as the assistant's reply to (context, images); one right-padded batch.

        Scored as lmms-eval's ``llava`` model scores multiple choice: the template's conversation with the
        continuation as the reply, counting the reply's tokens and the template's end of turn (see
        :meth:`scoring_prompts`); :attr:`ContinuationScore.loss` is the number it returns.
        """
        requests = zip(contexts, continuations, visuals, strict=True)
        pairs = [self._scoring_ids(c, k, len(v)) for c, k, v in requests]
        input_ids, mask = pad_right([ids for ids, _ in pairs], self.pad_id)
        labels, _ = pad_right([lab for _, lab in pairs], IGNORE_INDEX)
        pixels, sizes = self._images(visuals)
        if self.tally is not None and self.tally.kind != "kept":
            return self._scores_after_prefill(pairs, pixels, sizes)
        device = self.model.device
        batch = self.model.multimodal_batch(
            input_ids.to(device), mask.to(device), labels.to(device), pixels, sizes,
            **self.instruction_kwargs(contexts),
        )  # fmt: skip
        if pixels is not None:  # a selection chose before the language model: the reply cannot change its choice
            self.record_prefill(len(contexts), True, [int(n) or None for n in (batch.image_ids >= 0).sum(dim=1)])
        logits = self.model(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
        # position t predicts token t + 1; labels mark the scored tokens in the spliced (image-expanded) sequence
        labels = batch.labels
        return [score_tokens(row, targets) for row, targets in zip(logits[:, :-1], labels[:, 1:], strict=True)]

    def _scores_after_prefill(
        self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], pixels: Any, sizes: list | None
    ) -> list[ContinuationScore]:
        """:meth:`loglikelihood` with an in-LLM method: the open prompts are prefilled (left-padded, one batch), so the
        method selects image tokens from the prompt as it does when answering it; the replies are then read over
        that cache. Scoring the answered conversation in one pass would let the reply itself pick the image tokens.

        Args:
            pairs: (ids (L,), labels (L,)) per request, as :meth:`_scoring_ids` makes them.
        """
        starts = [int((labels != IGNORE_INDEX).nonzero()[0, 0]) for _, labels in pairs]
        prompt_ids, prompt_mask = pad_right([ids[:start] for (ids, _), start in zip(pairs, starts, strict=True)], 0)
        reply_ids, reply_mask = pad_right([ids[start:] for (ids, _), start in zip(pairs, starts, strict=True)], 0)
        device = self.model.device
        batch = self.model.multimodal_batch(
            prompt_ids.to(device), prompt_mask.to(device), None, pixels, sizes, "left", truncate=False
        )  # (B, P, C) left-padded: every row's last column is its last prompt token
        prefill = self.model(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            use_cache=True, image_ids=batch.image_ids, logits_to_keep=1,
        )  # fmt: skip
        self.record_prefill(len(pairs), pixels is not None)
        last = batch.position_ids.masked_fill(batch.attention_mask == 0, 0).max(dim=1).values  # (B,)
        positions = last[:, None] + 1 + torch.arange(reply_ids.shape[1], device=device)  # (B, R)
        reply = self.model(
            input_ids=reply_ids.to(device), attention_mask=torch.cat([batch.attention_mask, reply_mask.to(device)], 1),
            position_ids=positions, past_key_values=prefill.past_key_values, use_cache=True,
        )  # fmt: skip
        logits = torch.cat([prefill.logits[:, -1:], reply.logits[:, :-1]], dim=1)  # (B, R, V): column r -> token r
        targets = reply_ids.masked_fill(reply_mask == 0, IGNORE_INDEX).to(device)  # (B, R)
        return [score_tokens(row, row_targets) for row, row_targets in zip(logits, targets, strict=True)]
