"""Batched answers and log-likelihoods from transformers' LLaVA classes with VisionZip (llava-hf checkpoints).

The lmms-eval models ``llava_hf_visionzip`` and ``llava_onevision_visionzip`` are thin adapters around
:class:`HfLlavaRunner`, which loads a llava-hf checkpoint into the VisionZip subclass of its transformers class
(``visionzip.hf``), picked by the checkpoint config's ``model_type``, with the matching processor. Prompts
are the checkpoint's own chat template (one user turn; ``{"type": "image"}`` items for the images unless the
context already holds ``<image>``); generation pads on the left, scoring on the right. No lmms-eval import.

``llava_hf_visionzip`` also runs the encoder-side selections (``method=divprune|vispruner|cdpruner``,
``visionzip.hf.selection``): the model and its processor take the same method; CDPruner reads each request's question
without its answer-format suffix (:mod:`eval.instructions`) and CLIP's text tower from ``clip_text=`` (llava-hf
checkpoints hold none). It also runs the in-LLM methods (``method=fastv|pdrop|sparsevlm``, ``visionzip.hf.inllm``):
the processor counts the parent's placeholders and the language model prunes them. The visual tokens each request gave
the language model (a selection's), or the achieved layer-average of an in-LLM method, are tallied
(:mod:`eval.visual_tokens`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import AutoConfig

from eval.instructions import instructions_for
from eval.options import ModelOptions
from eval.runner import ContinuationScore, Visuals, cut_at_stops, generation_settings, score_tokens
from eval.visual_tokens import VisualTokenTally
from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava.model.placement import load_placed
from visionzip.baselines.select import needs_text
from visionzip.encoders import get_adapter

logger = logging.getLogger(__name__)

# ModelOptions that name our own LLaVA's loader or layouts, which transformers' classes do not have
_OWN_LLAVA_ONLY = ("model_base", "conv_template")


@dataclass(frozen=True)
class HfFamily:
    """A transformers model family with VisionZip: the model and processor classes (``visionzip.hf``)."""

    model_class: type
    processor_class: type


def check_hf_options(options: ModelOptions, model_name: str) -> None:
    """ValueError for model args transformers' classes cannot follow: our loader's (``model_base``, ``conv_template``:
    the checkpoint's chat template is used), ``positions=original`` and a ``total`` budget over views (the VisionZip
    subclasses compress every view to one per-view budget, with packed positions)."""
    given = [name for name in _OWN_LLAVA_ONLY if getattr(options, name) is not None]
    if given:
        raise ValueError(f"model_args {given} apply to llava_visionzip (our LLaVA), not {model_name}")
    if options.positions == "original":
        raise ValueError(f"{model_name} places the kept tokens packed: expected positions=packed (or none)")
    if options.visionzip_budget == "total":
        raise ValueError(f"{model_name} takes the budget per view: expected visionzip_budget=per_crop (or none)")


def load_hf_model(options: ModelOptions, device: str, families: dict[str, HfFamily], model_name: str) -> Any:
    """The model of ``options.pretrained`` with the options' VisionZip budget (else the checkpoint's), eval mode.

    The class comes from the checkpoint config's ``model_type`` (one of ``families``), never from its name. A budget
    given for an encoder without [CLS] (SigLIP: OneVision) scores by attention received unless ``cls_token`` is set.
    """
    check_hf_options(options, model_name)
    model_type = AutoConfig.from_pretrained(options.pretrained).model_type
    if model_type not in families:
        raise ValueError(
            f"{model_name} runs checkpoints of model_type {sorted(families)}; {options.pretrained} is {model_type!r}"
        )
    family = families[model_type]
    attn = options.attn_implementation
    model = load_placed(family.model_class, options.pretrained, device, options.torch_dtype, attn_implementation=attn)
    budget_given = options.budget is not None or options.dominant is not None
    if budget_given and options.cls_token is None and not get_adapter(model.model.vision_tower).has_cls:
        options = options.replace(cls_token=False)
    requested = options.requested_visionzip(model.config.vision_feature_layer, model.visionzip_config)
    if options.selection_method is not None:
        use_selection(model, options, model_name)
    elif options.llm_method is not None:
        use_pruning(model, options, model_name)
    elif options.visionzip == "off":
        model.set_visionzip(None)
    elif requested is not None:  # method=visionzip replaces a saved selection; a bare budget beside one is refused
        model.set_method(requested) if options.method is not None else model.set_visionzip(requested)
    logger.info("%s: %s (%s) on %s, %s", model_name, options.pretrained, model_type, device,
                getattr(model, "method_config", model.visionzip_config))  # fmt: skip
    return model


def use_selection(model: Any, options: ModelOptions, model_name: str) -> None:
    """Set the selection ``options`` name on a transformers model with selections (VisionZip off); CDPruner's text
    tower from ``clip_text``, refused without one."""
    selection = options.requested_selection()
    if options.clip_text is not None:
        model.set_clip_text(options.clip_text)
    if needs_text(selection) and model.model.clip_text is None:
        raise ValueError(
            f"model_args method={options.method} on {model_name} reads CLIP's text tower, which llava-hf checkpoints "
            "do not hold: expected clip_text=<full CLIP checkpoint> (e.g. openai/clip-vit-large-patch14-336)"
        )
    model.set_method(selection)


def use_pruning(model: Any, options: ModelOptions, model_name: str) -> None:
    """Set the in-LLM method ``options`` name (VisionZip and selections off); a model that cannot run it is refused
    naming the model args and the numbers."""
    if not hasattr(model, "set_pruning"):
        raise ValueError(f"model_args method={options.method}: {model_name}'s {type(model).__name__} has no owned loop")
    try:
        model.set_method(options.requested_pruning())
    except ValueError as err:
        raise ValueError(f"model_args method={options.method} on {options.pretrained}: {err}") from err


def on_model(batch: Any, model: Any) -> dict[str, torch.Tensor]:
    """A processor's batch on ``model``'s device, its floating tensors (pixels) in ``model``'s dtype."""
    out = {}
    for key, value in batch.items():
        value = value.to(model.device)
        out[key] = value.to(model.dtype) if value.is_floating_point() else value
    return out


def user_message(context: str, num_images: int) -> list[dict]:
    """The one user turn: an image item per image, then the text; a context that holds ``<image>`` keeps its own."""
    images = [] if DEFAULT_IMAGE_TOKEN in context else [{"type": "image"}] * num_images
    return [{"role": "user", "content": [*images, {"type": "text", "text": context}]}]


class HfLlavaRunner:
    """A loaded transformers LLaVA (VisionZip on or off) answering batches of (context, images) requests.

    Args:
        model, processor: a VisionZip subclass of a transformers LLaVA class and its processor (same budget).
        greedy: decode greedily whatever the task asks.
        max_new_tokens: used when a task sets none.
    """

    def __init__(self, model: Any, processor: Any, greedy: bool = True, max_new_tokens: int = 1024) -> None:
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.greedy, self.max_new_tokens = greedy, max_new_tokens
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        # generation never picks these (an exported <image> token); scoring leaves them out of the softmax too
        self.suppressed = list(getattr(model.generation_config, "suppress_tokens", None) or [])
        self.tally: VisualTokenTally | None = None  # a selection's kept tokens, set by load

    def instruction_kwargs(self, contexts: Sequence[str]) -> dict[str, list[str]]:
        """``{"instructions": [...]}`` (one per request: its question without the answer-format suffix) where the
        model's selection reads them (CDPruner); else nothing."""
        selection = getattr(self.model, "selection_config", None)
        if selection is None or not needs_text(selection):
            return {}
        return {"instructions": instructions_for(contexts)}

    def record(self, inputs: dict[str, torch.Tensor]) -> None:
        """Add each row's image placeholders (the visual tokens the language model receives) to :attr:`tally`, or
        with an in-LLM method the last prefill's achieved layer-averages."""
        if self.tally is None:
            return
        if self.tally.kind != "kept":
            rows = inputs["input_ids"].shape[0]
            self.tally.add(self.model.pruning_report() if "pixel_values" in inputs else [None] * rows)
            return
        image = (inputs["input_ids"] == self.model.config.image_token_id) & inputs["attention_mask"].bool()
        self.tally.add([(float(n), float(n)) if n else None for n in image.sum(dim=1).tolist()])

    @classmethod
    def load(cls, options: ModelOptions, device: str, families: dict[str, HfFamily], model_name: str) -> HfLlavaRunner:
        """:func:`load_hf_model` on ``device`` and its family's processor with the same budget; the options'
        decoding settings."""
        model = load_hf_model(options, device, families, model_name)
        processor_class = families[model.config.model_type].processor_class
        selection = getattr(model, "selection_config", None)  # families without selections have no such property
        pruning = getattr(model, "pruning_config", None)  # nor without in-LLM methods
        if selection is not None or pruning is not None:  # an in-LLM method: the parent's placeholder count
            processor = processor_class.from_pretrained(options.pretrained, method=selection or pruning)
        else:
            processor = processor_class.from_pretrained(options.pretrained, visionzip=model.visionzip_config)
        runner = cls(model, processor, options.greedy, options.max_new_tokens)
        if selection is not None:  # a selection keeps its tokens in every layer: the tally counts them
            runner.tally = VisualTokenTally(
                selection.name, selection.to_dict(), float(selection.tokens), options.multiturn, kind="kept"
            )
        elif pruning is not None:  # the achieved layer-average of each prefill, as our LLaVA's runner tallies it
            runner.tally = VisualTokenTally(
                pruning.name, pruning.to_dict(), options.nominal_budget(), options.multiturn
            )
        return runner

    def prompt(self, context: str, num_images: int, reply: str | None = None) -> str:
        """The chat template's text: the user turn and the open assistant turn, or ``reply`` as the assistant's."""
        messages = user_message(context, num_images)
        if reply is None:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)

    def _inputs(self, prompts: list[str], visuals: Sequence[Visuals], padding_side: str) -> dict[str, torch.Tensor]:
        """The processor's batch (ids (B, L) with every image's placeholders, mask, pixels) on the model's device."""
        flat = [image for images in visuals for image in images]
        for image in flat:
            if not isinstance(image, Image.Image):
                raise ValueError(f"{type(self).__name__} takes PIL images; got {type(image).__name__} (video/audio?)")
        images = [image.convert("RGB") for image in flat] or None
        batch = self.processor(
            text=prompts, images=images, return_tensors="pt", padding=True, padding_side=padding_side
        )
        return on_model(batch, self.model)

    @torch.inference_mode()
    def generate(self, contexts: Sequence[str], visuals: Sequence[Visuals], task_kwargs: dict) -> list[str]:
        """One answer per (context, images), decoded together as one left-padded batch (the task's kwargs)."""
        settings = generation_settings(task_kwargs, self.greedy, self.max_new_tokens)
        prompts = [self.prompt(c, len(v)) for c, v in zip(contexts, visuals, strict=True)]
        inputs = self._inputs(prompts, visuals, "left")
        stops = {"stop_strings": settings.stops, "tokenizer": self.tokenizer} if settings.stops else {}
        extra = self.instruction_kwargs(contexts)
        output = self.model.generate(**inputs, pad_token_id=self.pad_id, **stops, **extra, **settings.kwargs)
        self.record(inputs)
        new = output[:, inputs["input_ids"].shape[1] :]  # (B, T_new)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [cut_at_stops(text, settings.stops) for text in texts]

    @torch.inference_mode()
    def loglikelihood(
        self, contexts: Sequence[str], continuations: Sequence[str], visuals: Sequence[Visuals]
    ) -> list[ContinuationScore]:
        """How likely each continuation is as the assistant's reply; one right-padded batch.

        The chat template renders the reply (with its end of turn); the scored tokens are those past the open
        prompt's token count, as :meth:`eval.runner.LlavaRunner.loglikelihood` counts them.
        """
        requests = list(zip(contexts, continuations, visuals, strict=True))
        opened = self._inputs([self.prompt(c, len(v)) for c, _, v in requests], visuals, "right")
        answered = self._inputs([self.prompt(c, len(v), k) for c, k, v in requests], visuals, "right")
        starts = opened["attention_mask"].sum(dim=1).tolist()  # (B,) open-prompt tokens, images expanded
        ids, mask = answered["input_ids"], answered["attention_mask"]  # (B, L)
        if self.tally is not None and self.tally.kind != "kept":
            replies = [row[start:end] for row, start, end in zip(ids, starts, mask.sum(dim=1).tolist(), strict=True)]
            prompts = [self.prompt(c, len(v)) for c, _, v in requests]
            return self._scores_after_prefill(self._inputs(prompts, visuals, "left"), replies, continuations)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        for row, start in enumerate(starts):
            if mask[row].sum() <= start:
                raise ValueError(f"continuation {continuations[row]!r} adds no token to the prompt")
            labels[row, :start] = IGNORE_INDEX
        logits = self.model(**answered, **self.instruction_kwargs(contexts)).logits.float()  # (B, L, V)
        self.record(answered)
        if self.suppressed:
            logits[..., self.suppressed] = float("-inf")
        # position t predicts token t + 1
        return [score_tokens(row, targets) for row, targets in zip(logits[:, :-1], labels[:, 1:], strict=True)]

    def _scores_after_prefill(
        self, opened: dict[str, torch.Tensor], replies: list[torch.Tensor], continuations: Sequence[str]
    ) -> list[ContinuationScore]:
        """:meth:`loglikelihood` with an in-LLM method, as our LLaVA's runner scores it
        (:meth:`eval.runner.LlavaRunner.loglikelihood`): the open prompts are prefilled (left-padded, one batch), so the
        method selects image tokens from the prompt as it does when answering it; the replies are then read over that
        cache (scoring the answered conversation in one pass would let the reply pick the image tokens).

        Args:
            opened: the processor's left-padded batch of open prompts; replies: each row's reply tokens (R_i,).
        """
        empty = [continuations[row] for row, reply in enumerate(replies) if reply.numel() == 0]
        if empty:
            raise ValueError(f"continuation {empty[0]!r} adds no token to the prompt")
        prefill = self.model(**opened, use_cache=True, logits_to_keep=1)
        self.record(opened)
        longest = max(reply.numel() for reply in replies)
        reply_ids = opened["input_ids"].new_full((len(replies), longest), self.pad_id)  # (B, R) right-padded
        reply_mask = torch.zeros_like(reply_ids)
        for row, reply in enumerate(replies):
            reply_ids[row, : reply.numel()], reply_mask[row, : reply.numel()] = reply, 1
        prompt_mask = opened["attention_mask"]
        positions = prompt_mask.sum(dim=1, keepdim=True) + torch.arange(longest, device=reply_ids.device)  # (B, R)
        reply = self.model(
            input_ids=reply_ids, attention_mask=torch.cat([prompt_mask, reply_mask], dim=1), position_ids=positions,
            past_key_values=prefill.past_key_values, use_cache=True,
        )  # fmt: skip
        logits = torch.cat([prefill.logits[:, -1:], reply.logits[:, :-1]], dim=1).float()  # column r -> token r
        if self.suppressed:
            logits[..., self.suppressed] = float("-inf")
        targets = reply_ids.masked_fill(reply_mask == 0, IGNORE_INDEX)  # (B, R)
        return [score_tokens(row, row_targets) for row, row_targets in zip(logits, targets, strict=True)]
