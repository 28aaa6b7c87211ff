"""DivPrune, VisPruner and CDPruner in the subclasses of transformers' LLaVA classes: ``config.token_selection``, its
checks, the patches each view keeps, and the rows' instructions that CDPruner reads.

A selection acts where VisionZip does (spec sections 5-7, ``visionzip.baselines.select``): on the encoder layer the
projector reads (``vision_feature_layer``), every view (AnyRes crop) on its own, ``tokens`` patches per view kept in
raster order with packed positions; [CLS] is never kept (LLaVA-1.5 / NeXT drop it, ``"default"`` strategy). One
encoder-side method at a time: VisionZip (``config.visionzip``) or a selection (``config.token_selection``, the key our
own LLaVA saves too), both written into ``config.json`` and read back by ``from_pretrained``.

    model = VisionZipLlavaForConditionalGeneration.from_pretrained(id, method=DivPruneConfig(tokens=64))
    model = VisionZipLlavaForConditionalGeneration.from_pretrained(
        id, method=CDPrunerConfig(tokens=64), clip_text="openai/clip-vit-large-patch14-336")
    processor = VisionZipLlavaProcessor.from_pretrained(id, method=model.method_config)
    out = model.generate(**processor(images=images, text=prompts, return_tensors="pt"), instructions=questions)

CDPruner's relevance needs CLIP's text tower, which llava-hf checkpoints do not hold: ``clip_text=`` names the full
CLIP checkpoint (:class:`visionzip.hf.clip_text.CLIPTextRelevance`, held outside the state dict). ``instructions``
(on ``generate`` and ``forward``) are one per row of ``input_ids``; every image of a row uses its row's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from visionzip.anyres import Grid, visionzip_layout
from visionzip.baselines.divprune import check_keep
from visionzip.baselines.select import SelectionConfig, gather_kept, needs_text, select_views, selection_from_dict
from visionzip.baselines.vispruner import VisPrunerConfig
from visionzip.config import VisionZipConfig
from visionzip.encode import capture, run_to_layer
from visionzip.encoders import get_adapter
from visionzip.hf.clip_text import CLIPTextRelevance
from visionzip.hf.common import (
    CONFIG_KEY,
    SAVED,
    VisionZipPretrainedMixin,
    VisionZipProcessorMixin,
    feature_layer_index,
)
from visionzip.hf.inllm import is_pruning

SELECTION_KEY = "token_selection"  # model.config.token_selection / processor_config.json: SelectionConfig.to_dict()
EncoderMethod = VisionZipConfig | SelectionConfig
Relevance = Callable[[torch.Tensor], torch.Tensor]  # (V, N, C_vision) patch features -> (V, N) relevance
NEEDS_INSTRUCTIONS = "CDPruner needs each row's instruction: pass instructions=[...] (one per row of input_ids)"


def as_selection(value: SelectionConfig | dict | None) -> SelectionConfig | None:
    """A selection from what users pass or configs store: a config, its dict (``{"method": name, ...}``) or None."""
    if value is None or isinstance(value, SelectionConfig):
        return value
    if isinstance(value, dict):
        return selection_from_dict(value)
    raise ValueError(f"token_selection must be a DivPrune/VisPruner/CDPruner config, its dict or None, got {value!r}")


def as_encoder_method(value: EncoderMethod | dict | None) -> EncoderMethod | None:
    """An encoder-side method from ``method=``: a :class:`VisionZipConfig` or a selection, a dict of either (a
    selection's has ``"method"``; ``{"method": "visionzip", ...}`` is VisionZip's too), or None (off)."""
    if isinstance(value, dict) and value.get("method", "visionzip") == "visionzip":
        return VisionZipConfig.from_dict({k: v for k, v in value.items() if k != "method"})
    if isinstance(value, VisionZipConfig):
        return value
    return as_selection(value)


def saved_selection(config: Any) -> SelectionConfig | None:
    """The selection written in a transformers config (``config.token_selection``), or None."""
    return as_selection(getattr(config, SELECTION_KEY, None))


@dataclass
class KeptPatches:
    """The patches each view keeps.

    Attributes:
        projected: (V, T, C_llm) the kept patches' projected tokens, raster order.
        encoder: (V, T, C_vision) their encoder features at the feature layer.
        keep: (V, T) ascending patch positions (0 = the first patch; [CLS] not counted).
    """

    projected: torch.Tensor
    encoder: torch.Tensor
    keep: torch.Tensor


def select_patches(
    tower: nn.Module, project: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, cfg: SelectionConfig,
    layer: int, relevance: Relevance | None = None,
) -> KeptPatches:  # fmt: skip
    """Run ``tower`` on (V, 3, S, S) views to encoder ``layer`` (0-based) and keep ``cfg.tokens`` patches per view.

    DivPrune and CDPruner select on the projected patches (CDPruner also on ``relevance`` of the patch features);
    VisPruner on the patch features and the [CLS] row's attention at that layer (head sum, captured without eager
    attention), then projects only what it keeps.
    """
    prefix = int(get_adapter(tower).has_cls)
    if isinstance(cfg, VisPrunerConfig):
        seen = capture(tower, pixels, VisionZipConfig(layer=layer))
        patches, attention = seen.features[:, prefix:], seen.scores[:, prefix:]  # (V, N, C_vision), (V, N)
        keep = select_views(cfg, encoder=patches, cls_attention=attention)  # (V, T)
        kept = gather_kept(patches, keep)  # (V, T, C_vision)
        return KeptPatches(project(kept), kept, keep)
    patches = run_to_layer(tower, pixels, layer)[:, prefix:]  # (V, N, C_vision)
    projected = project(patches)  # (V, N, C_llm)
    scores = None
    if needs_text(cfg):
        if relevance is None:
            raise ValueError(NEEDS_INSTRUCTIONS)
        scores = relevance(patches)  # (V, N)
    keep = select_views(cfg, projected=projected, relevance=scores)
    return KeptPatches(gather_kept(projected, keep), gather_kept(patches, keep), keep)


def anyres_selection_layout(kept: KeptPatches, grids: Sequence[Grid], side: int) -> list[torch.Tensor]:
    """Each image's (V_i * T, C_llm) tokens in VisionZip's per-crop layout (:func:`visionzip_layout`, no
    ``image_newline``): the base view's kept patches, then all crops' kept patches in the raster order of the stitched
    patch grid. ``kept`` holds the views of all images in order; ``side``: patches per view side."""
    views = [grid.views for grid in grids]
    tokens = kept.keep.shape[1]
    return [
        visionzip_layout(image, keep, grid, side, dominant=tokens, prefix=0)
        for image, keep, grid in zip(kept.projected.split(views), kept.keep.split(views), grids, strict=True)
    ]


def rows_to_images(
    instructions: Sequence[str], input_ids: torch.Tensor | None, image_token_id: int, counts: Sequence[int]
) -> list[str]:
    """One instruction per image from one per row of ``input_ids``: images follow the rows in order, and a row holds
    the images whose placeholder ``counts`` sum to its own placeholders. ValueError when they do not add up."""
    if input_ids is None:
        raise ValueError("instructions are one per row of input_ids: pass input_ids, not inputs_embeds")
    per_row = (input_ids == image_token_id).sum(dim=1).tolist()  # (B,)
    if len(instructions) != len(per_row):
        raise ValueError(f"instructions must be one per row: {len(instructions)} given for {len(per_row)} rows")
    out: list[str] = []
    for row, placeholders in enumerate(per_row):
        while placeholders > 0 and len(out) < len(counts):
            placeholders -= counts[len(out)]
            out.append(instructions[row])
        if placeholders != 0:
            raise ValueError(f"row {row}'s image placeholders do not match its images' token counts {list(counts)}")
    if len(out) != len(counts):
        raise ValueError(f"{len(counts)} images but the rows' placeholders cover {len(out)}")
    return out


def post_layernorm(tower: nn.Module) -> nn.Module:
    """The tower's final LayerNorm (CLIP's ``vision_model.post_layernorm``), which CDPruner's image embeds use."""
    core = tower  # transformers 5's CLIPVisionModel holds it; CLIPModel-like wrappers one ``vision_model`` down
    while not hasattr(core, "post_layernorm") and isinstance(getattr(core, "vision_model", None), nn.Module):
        core = core.vision_model
    norm = getattr(core, "post_layernorm", None)
    if norm is None:
        raise ValueError(f"CDPruner reads the tower's post_layernorm; {type(tower).__name__} has none")
    return norm


class SelectionModelMixin:
    """The inner ``Llava*Model``'s selection step; placed before that class in the bases. ``clip_text`` (CDPruner's
    text tower) is set by the outer model, outside the state dict."""

    config: Any
    vision_tower: nn.Module
    multi_modal_projector: nn.Module
    clip_text: Any = None

    def kept_patches(self, pixels: torch.Tensor, cfg: SelectionConfig, instructions: list[str] | None) -> KeptPatches:
        """(V, 3, S, S) views -> :class:`KeptPatches`; ``instructions``: one per view (CDPruner's), else unused."""
        layer = feature_layer_index(self.config.vision_feature_layer, self.config.vision_config.num_hidden_layers)
        relevance = None
        if needs_text(cfg):
            if instructions is None:
                raise ValueError(NEEDS_INSTRUCTIONS)
            if self.clip_text is None:
                raise ValueError(
                    "CDPruner needs CLIP's text tower, which llava-hf checkpoints do not hold: load with "
                    "from_pretrained(..., clip_text='openai/clip-vit-large-patch14-336') or call set_clip_text(...)"
                )
            if len(instructions) != pixels.shape[0]:
                raise ValueError(f"{len(instructions)} instructions for {pixels.shape[0]} views")
            norm = post_layernorm(self.vision_tower)

            def relevance(patches: torch.Tensor) -> torch.Tensor:
                return self.clip_text.relevance(patches, norm, list(instructions)).to(patches.device)

        return select_patches(self.vision_tower, self.multi_modal_projector, pixels, cfg, layer, relevance)

    def check_selection_layer(self, vision_feature_layer: Any) -> None:
        """A ``vision_feature_layer`` passed at call time must be the config's (the selection reads that layer)."""
        if vision_feature_layer is None:
            return
        num_layers = self.config.vision_config.num_hidden_layers
        expected = self.config.vision_feature_layer
        if feature_layer_index(vision_feature_layer, num_layers) != feature_layer_index(expected, num_layers):
            raise ValueError(
                f"vision_feature_layer={vision_feature_layer} differs from the config's {expected}, "
                "which the token selection reads"
            )


class SelectionPretrainedMixin(VisionZipPretrainedMixin):
    """VisionZip's ``from_pretrained``/``set_visionzip`` plus the selections, for an outer ``Llava*ForConditional
    Generation`` whose inner model has :class:`SelectionModelMixin`.

    ``from_pretrained(id, method=cfg)`` turns on any encoder-side method (VisionZip or a selection; None: off);
    ``visionzip=`` keeps its meaning (VisionZip only). Not given: what ``config.json`` saves.
    ``instructions=[...]`` on ``forward``/``generate``: one per row (CDPruner's relevance); other methods ignore them.
    """

    config: Any
    model: Any

    @classmethod
    def from_pretrained(
        cls, *args: Any, visionzip: Any = SAVED, method: Any = SAVED, clip_text: str | None = None, **kwargs: Any
    ) -> Any:
        """transformers' ``from_pretrained``; ``method``/``visionzip``: see the class docstring; ``clip_text``: the
        full CLIP checkpoint (id or folder) whose text tower CDPruner reads, loaded beside the model. ``method=``
        asking for CDPruner without it is refused here; a checkpoint that saves CDPruner loads without it, and its
        first image is refused with the same advice."""
        if visionzip is not SAVED and method is not SAVED:
            raise ValueError("give one of method= and visionzip= (method= takes a VisionZipConfig too)")
        loaded = super().from_pretrained(*args, visionzip=None if method is not SAVED else visionzip, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.set_method(model.method_config if method is SAVED else method)
        if clip_text is not None:
            model.set_clip_text(clip_text)
        selection = model.selection_config
        if method is not SAVED and selection is not None and needs_text(selection) and model.model.clip_text is None:
            raise ValueError(
                f"{selection.describe()} reads CLIP's text tower, which llava-hf checkpoints do not hold: pass "
                "clip_text= naming the full CLIP checkpoint (e.g. 'openai/clip-vit-large-patch14-336')"
            )
        return loaded

    @property
    def selection_config(self) -> SelectionConfig | None:
        """The selection in use (``config.token_selection``), or None."""
        return saved_selection(self.config)

    @property
    def method_config(self) -> EncoderMethod | None:
        """The encoder-side method in use (VisionZip's budget or a selection), or None."""
        return self.visionzip_config or self.selection_config

    def set_visionzip(self, cfg: Any) -> None:
        """VisionZip on with ``cfg`` or off (None); refused while a selection is on."""
        if cfg is not None and self.selection_config is not None:
            raise ValueError(
                f"VisionZip and {self.selection_config.describe()} are both asked for: one encoder-side method at "
                "a time (set_method(...) replaces the one in use)"
            )
        super().set_visionzip(cfg)

    def set_selection(self, cfg: SelectionConfig | dict | None) -> None:
        """A selection on (``tokens`` per view) or off (None), checked against the encoder; refused while VisionZip
        is on."""
        cfg = as_selection(cfg)
        if cfg is not None:
            if self.visionzip_config is not None:
                raise ValueError(
                    f"{cfg.describe()} and VisionZip ({self.visionzip_config}) are both asked for: one encoder-side "
                    "method at a time (set_method(...) replaces the one in use)"
                )
            self._check_selection(cfg)
        setattr(self.config, SELECTION_KEY, None if cfg is None else cfg.to_dict())

    def set_method(self, cfg: EncoderMethod | dict | None) -> None:
        """Replace the encoder-side method in use with ``cfg`` (VisionZip or a selection; None: off)."""
        cfg = as_encoder_method(cfg)
        setattr(self.config, CONFIG_KEY, None)
        setattr(self.config, SELECTION_KEY, None)
        if isinstance(cfg, VisionZipConfig):
            self.set_visionzip(cfg)
        else:
            self.set_selection(cfg)

    def set_clip_text(self, value: Any) -> None:
        """CDPruner's text tower: a :class:`~visionzip.hf.clip_text.CLIPTextRelevance`, a checkpoint to load one
        from (on this model's device and dtype), or None. Kept outside the state dict and ``parameters()``."""
        if isinstance(value, str):
            value = CLIPTextRelevance.from_pretrained(value, dtype=self.dtype, device=self.device)
        object.__setattr__(self.model, "clip_text", value)  # not nn.Module.__setattr__: never a submodule

    def _check_selection(self, cfg: SelectionConfig) -> None:
        tower, vision = self.model.vision_tower, self.config.vision_config
        feature_layer_index(self.config.vision_feature_layer, vision.num_hidden_layers)  # one int layer
        if isinstance(cfg, VisPrunerConfig) and not get_adapter(tower).has_cls:
            raise ValueError(f"VisPruner reads the [CLS] row's attention; {type(tower).__name__} has no [CLS] token")
        check_keep(cfg.name, cfg.tokens, (vision.image_size // vision.patch_size) ** 2)

    def image_token_counts(self, pixel_values: Any, image_sizes: Any) -> list[int]:
        """Placeholders of each image under the selection in use (the family's count)."""
        raise NotImplementedError

    def _encode_rows(self, kwargs: dict[str, Any], instructions: Sequence[str] | None) -> dict[str, Any]:
        """``kwargs`` of ``forward``/``generate`` with the images encoded now, each with its row's instruction
        (``mm_encoder_outputs``), when the selection in use reads text; else unchanged."""
        selection = self.selection_config
        pixels = kwargs.get("pixel_values")
        if selection is None or not needs_text(selection) or pixels is None:
            return kwargs
        if instructions is None:
            raise ValueError(NEEDS_INSTRUCTIONS)
        image_sizes = kwargs.get("image_sizes")
        counts = self.image_token_counts(pixels, image_sizes)
        per_image = rows_to_images(instructions, kwargs.get("input_ids"), self.config.image_token_id, counts)
        features = self.model.get_image_features(
            pixel_values=pixels, image_sizes=image_sizes, vision_feature_layer=kwargs.get("vision_feature_layer"),
            image_instructions=per_image, return_dict=True,
        )  # fmt: skip
        rest = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "image_sizes")}
        return {**rest, "mm_encoder_outputs": {"image": features}}

    def forward(
        self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None, *,
        attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
        past_key_values: Any = None, inputs_embeds: torch.Tensor | None = None, vision_feature_layer: Any = None,
        vision_feature_select_strategy: str | None = None, labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0, image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None, instructions: Sequence[str] | None = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """The parent's ``forward`` (arguments after ``pixel_values`` by name only: the two parents order them
        differently); ``instructions``: one per row of ``input_ids`` (CDPruner's relevance).

        Every parent argument is named here because ``generate`` checks its keyword arguments against this
        signature and encodes images ahead only when it lists ``mm_encoder_outputs``.
        """
        images = dict(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
            vision_feature_layer=vision_feature_layer, mm_encoder_outputs=mm_encoder_outputs,
        )  # fmt: skip
        return super().forward(
            attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels, logits_to_keep=logits_to_keep, **self._encode_rows(images, instructions), **kwargs,
        )  # fmt: skip

    @torch.no_grad()
    def generate(self, *args: Any, instructions: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The parent's ``generate``; ``instructions``: one per row of ``input_ids`` (CDPruner's relevance), read
        once, before the prefill (each image is encoded with its row's instruction)."""
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        return super().generate(*args, **self._encode_rows(kwargs, instructions))


class SelectionProcessorMixin(VisionZipProcessorMixin):
    """A LLaVA processor counting the placeholders of VisionZip or of a selection (``tokens`` per view):
    ``visionzip=``/``token_selection=`` in ``__init__`` (saved in ``processor_config.json``), ``method=`` (either)
    or ``visionzip=`` in ``from_pretrained``."""

    token_selection: dict | None

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, patch_size: int | None = None,
        vision_feature_select_strategy: str | None = None, chat_template: str | None = None,
        image_token: str = "<image>", num_additional_image_tokens: int = 0,
        visionzip: VisionZipConfig | dict | None = None, token_selection: SelectionConfig | dict | None = None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        selection = as_selection(token_selection)
        self.token_selection = None if selection is None else selection.to_dict()
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
            image_token=image_token, num_additional_image_tokens=num_additional_image_tokens, visionzip=visionzip,
            **kwargs,
        )  # fmt: skip
        self._check_one()

    @classmethod
    def from_pretrained(cls, *args: Any, visionzip: Any = SAVED, method: Any = SAVED, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``; ``method``: VisionZip's budget or a selection (None: the parent's
        count), ``visionzip``: VisionZip's only; not given: what ``processor_config.json`` saves."""
        if visionzip is not SAVED and method is not SAVED:
            raise ValueError("give one of method= and visionzip= (method= takes a VisionZipConfig too)")
        processor = super().from_pretrained(*args, visionzip=visionzip, **kwargs)
        if method is not SAVED:
            processor.set_method(method)
        processor._check_one()
        return processor

    @property
    def selection_config(self) -> SelectionConfig | None:
        """The selection the placeholders are counted with, or None."""
        return as_selection(self.token_selection)

    @property
    def method_config(self) -> EncoderMethod | None:
        """VisionZip's budget or the selection the placeholders are counted with, or None (the parent's count)."""
        return self.visionzip_config or self.selection_config

    def set_method(self, cfg: EncoderMethod | dict | None) -> None:
        """Count placeholders for ``cfg`` (VisionZip or a selection; None or an in-LLM method, which prunes after the
        placeholders are filled: the parent's count)."""
        cfg = None if is_pruning(cfg) else as_encoder_method(cfg)
        self._store_budget(cfg if isinstance(cfg, VisionZipConfig) else None)
        self.token_selection = None if cfg is None or isinstance(cfg, VisionZipConfig) else cfg.to_dict()

    def _check_one(self) -> None:
        if self.visionzip is not None and self.token_selection is not None:
            raise ValueError(
                f"a processor counts for one encoder-side method: both visionzip={self.visionzip} and "
                f"token_selection={self.token_selection} are set"
            )


__all__ = [
    "SELECTION_KEY",
    "KeptPatches",
    "SelectionModelMixin",
    "SelectionPretrainedMixin",
    "SelectionProcessorMixin",
    "anyres_selection_layout",
    "as_encoder_method",
    "as_selection",
    "rows_to_images",
    "saved_selection",
    "select_patches",
]
