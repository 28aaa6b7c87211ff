"""FastV, PDrop and SparseVLM in the subclasses of transformers' LLaVA classes: inside their language model.

The inner ``Llava*Model``'s language model (``LlamaModel``, ``MistralModel``, ``Qwen2Model``... whatever the text
config names) is built at construction as a subclass of its own class with the owned decoder loop in front
(:class:`~visionzip.hf.pruned.decoder.PrunedDecoderMixin`); without a method its ``forward`` is the parent's. The
method is ``config.token_pruning`` (the key our own LLaVA saves), written into ``config.json`` and read back:

    model = VisionZipLlavaForConditionalGeneration.from_pretrained(id, method=FastVConfig(keep=64))
    processor = VisionZipLlavaProcessor.from_pretrained(id)  # placeholders: the parent's count
    out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"), max_new_tokens=32)

Each token's image (``image_ids``: -1 for text, 0, 1, ... for the images of its row in order, all views of an image
one id) comes from the placeholder mask (``input_ids == image_token_id``) and each image's feature count. One method
at a time: an in-LLM method replaces VisionZip or a selection (``set_method``). A decode step, or a later turn on the
same cache, continues the cut cache.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from visionzip.baselines import PruneConfig
from visionzip.baselines.prune import METHODS, config_from_dict
from visionzip.hf.pruned.decoder import PrunedDecoderMixin, check_pruning

PRUNING_KEY = "token_pruning"  # model.config.token_pruning: PruneConfig.to_dict() ({"method": name, ...})


def is_pruning(value: Any) -> bool:
    """Whether ``value`` (what ``method=`` takes) names an in-LLM method: a FastV/PDrop/SparseVLM config or its dict."""
    return isinstance(value, PruneConfig) or (isinstance(value, dict) and value.get("method") in METHODS)


def as_pruning(value: PruneConfig | dict | None) -> PruneConfig | None:
    """An in-LLM method from what users pass or configs store: a config, its dict, or None (off)."""
    if value is None or isinstance(value, PruneConfig):
        return value
    if isinstance(value, dict):
        return config_from_dict(value)
    raise ValueError(f"token_pruning must be a FastV/PDrop/SparseVLM config, its dict or None, got {value!r}")


def saved_pruning(config: Any) -> PruneConfig | None:
    """The in-LLM method written in a transformers config (``config.token_pruning``), or None."""
    return as_pruning(getattr(config, PRUNING_KEY, None))


class OwnedLoopDecoder(PrunedDecoderMixin):
    """The owned loop in front of a transformers decoder, reading the method from the multimodal config that holds
    it (``pruning_owner``: the outer model's config; the decoder's own is only its ``text_config``)."""

    pruning_owner: Any = None

    def pruning_config(self) -> PruneConfig | None:
        return saved_pruning(self.pruning_owner)


@functools.cache
def pruned_decoder_class(base: type) -> type:
    """``base`` (a transformers decoder class) with :class:`OwnedLoopDecoder` in front; one class per base."""
    doc = f"``{base.__name__}`` running the owned decoder loop when ``config.token_pruning`` is set."
    return type(f"Pruned{base.__name__}", (OwnedLoopDecoder, base), {"__module__": __name__, "__doc__": doc})


def image_ids_from_mask(mask: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(B, N) bool placeholders and each image's token count (images in row order) -> (B, N) int64 image ids: 0, 1,
    ... for the images of each row in order, -1 elsewhere. ValueError when the counts do not fill the placeholders
    or an image would span two rows."""
    total, placed = sum(counts), int(mask.sum())
    if total != placed:
        raise ValueError(f"the images have {total} tokens ({counts}) but input_ids hold {placed} image placeholders")
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # (P,) in row order
    bounds = torch.tensor(counts, device=mask.device).cumsum(0)  # (I,) end of each image among the placeholders
    image = torch.bucketize(torch.arange(placed, device=mask.device), bounds, right=True)  # (P,) global image index
    split = (rows[1:] != rows[:-1]) & (image[1:] == image[:-1])
    if bool(split.any()):
        raise ValueError(f"an image of counts {counts} spans two rows of input_ids: each row holds whole images")
    first = torch.full((mask.shape[0],), placed, device=mask.device).scatter_reduce(0, rows, image, "amin")  # (B,)
    ids = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    ids[mask] = image - first[rows]
    return ids


def run_ids(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) bool -> (B, N) int64: 0, 1, ... for each row's maximal runs of True in order, -1 elsewhere (a video's
    placeholders are one run; two videos with no text between them would read as one)."""
    starts = mask & ~torch.nn.functional.pad(mask, (1, 0))[:, :-1]  # (B, N) first token of each run
    return (starts.long().cumsum(dim=1) - 1).masked_fill(~mask, -1)


class PruningModelMixin:
    """The inner ``Llava*Model`` with the owned loop in its language model; placed first in the bases. A call with
    images under a method encodes them here (as the parent would) to hand the language model ``image_ids``."""

    config: Any
    language_model: nn.Module

    def __init__(self, config: Any) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        # a subclass of the decoder class transformers built, swapped in here (under from_pretrained: on meta)
        self.language_model = pruned_decoder_class(type(self.language_model))(config.text_config)
        self.language_model.pruning_owner = config

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None, **kwargs: Any):
        """The parent's ``forward`` (all arguments after ``pixel_values`` by name); with an in-LLM method and images,
        the images are encoded first and the language model gets each token's ``image_ids``."""
        encoded = kwargs.get("mm_encoder_outputs") or {}
        has_images = encoded.get("image") is not None or (pixel_values is not None and pixel_values.shape[0] > 0)
        if saved_pruning(self.config) is None or not has_images:
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, **kwargs)  # type: ignore[misc]
        if input_ids is None:
            raise ValueError(
                "an in-LLM method finds each image's tokens in input_ids: pass input_ids, not inputs_embeds"
            )
        if encoded.get("image") is None:
            encoded = {**encoded, "image": self._encode(pixel_values, kwargs)}
        counts = [features.shape[0] for features in encoded["image"].pooler_output]
        image_ids = image_ids_from_mask(input_ids == self.config.image_token_id, counts)
        rest = {k: v for k, v in kwargs.items() if k not in ("mm_encoder_outputs", "image_sizes")}
        return super().forward(  # type: ignore[misc]
            input_ids=input_ids, mm_encoder_outputs=encoded, image_ids=image_ids, **rest
        )

    def _encode(self, pixel_values: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        """``get_image_features`` as the parent's ``forward`` calls it (by name: the two families order it apart)."""
        return self.get_image_features(  # type: ignore[attr-defined]
            pixel_values=pixel_values, image_sizes=kwargs.get("image_sizes"),
            vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"), return_dict=True,
        )  # fmt: skip


class VideoPruningModelMixin(PruningModelMixin):
    """:class:`PruningModelMixin` for Video-LLaVA's inner model: images (``image_tower``) and videos (``video_tower``,
    all frames of a video one id, counted after the row's images) both prune inside the language model."""

    def forward(
        self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None, **kwargs: Any,
    ):  # fmt: skip
        """The parent's ``forward`` (by name after ``pixel_values``, whose deprecated name ``pixel_values_images``
        the processor returns); with an in-LLM method the images and videos are encoded here first."""
        pixel_values = pixel_values if pixel_values is not None else kwargs.pop("pixel_values_images", None)
        encoded = dict(kwargs.pop("mm_encoder_outputs", None) or {})
        given = (pixel_values, pixel_values_videos, encoded.get("image"), encoded.get("video"))
        if saved_pruning(self.config) is None or all(value is None for value in given):
            pixels = {"pixel_values": pixel_values, "pixel_values_videos": pixel_values_videos}
            return super(PruningModelMixin, self).forward(  # type: ignore[misc]
                input_ids=input_ids, mm_encoder_outputs=encoded or None, **pixels, **kwargs
            )
        if input_ids is None:
            raise ValueError(
                "an in-LLM method finds each image's tokens in input_ids: pass input_ids, not inputs_embeds"
            )
        layer = kwargs.get("vision_feature_layer")
        if encoded.get("image") is None and pixel_values is not None:
            encoded["image"] = self.get_image_features(  # type: ignore[attr-defined]
                pixel_values=pixel_values, vision_feature_layer=layer, return_dict=True,
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
            )  # fmt: skip
        if encoded.get("video") is None and pixel_values_videos is not None:
            encoded["video"] = self.get_video_features(  # type: ignore[attr-defined]
                pixel_values_videos=pixel_values_videos, vision_feature_layer=layer, return_dict=True
            )
        ids = self._visual_ids(input_ids, encoded)
        return super(PruningModelMixin, self).forward(  # type: ignore[misc]
            input_ids=input_ids, mm_encoder_outputs=encoded, image_ids=ids, **kwargs
        )

    def _visual_ids(self, input_ids: torch.Tensor, encoded: dict[str, Any]) -> torch.Tensor:
        """(B, N) ids: each row's images (by their feature counts) 0, 1, ..., then its videos (by placeholder runs)."""
        images = input_ids == self.config.image_token_id
        counts = [] if encoded.get("image") is None else [f.shape[0] for f in encoded["image"].pooler_output]
        ids = image_ids_from_mask(images, counts)
        videos = run_ids(input_ids == self.config.video_token_id)
        after = (ids.max(dim=1, keepdim=True).values + 1).clamp(min=0)  # (B, 1) the row's image count
        return torch.where(videos >= 0, videos + after, ids)


class PruningPretrainedMixin:
    """The outer ``Llava*ForConditionalGeneration``'s in-LLM methods; placed before ``SelectionPretrainedMixin``.

    ``from_pretrained(id, method=FastVConfig(...) | PDropConfig(...) | SparseVLMConfig(...))`` and
    :meth:`set_method` take them beside the encoder-side methods (one method at a time); :meth:`set_pruning`
    turns one on (refused while an encoder-side method is on, and where the language model cannot meet it on the
    largest image's tokens, with the numbers).
    """

    config: Any

    @property
    def pruning_config(self) -> PruneConfig | None:
        """The in-LLM method in use (``config.token_pruning``), or None."""
        return saved_pruning(self.config)

    @property
    def method_config(self) -> Any:
        """The method in use: an in-LLM method, VisionZip's budget or a selection; None: off."""
        return self.pruning_config or super().method_config  # type: ignore[misc]

    def set_method(self, cfg: Any) -> None:
        """Replace the method in use with ``cfg`` (an in-LLM method, VisionZip or a selection; None: off)."""
        setattr(self.config, PRUNING_KEY, None)
        if is_pruning(cfg):
            super().set_method(None)  # type: ignore[misc]
            self.set_pruning(cfg)
        else:
            super().set_method(cfg)  # type: ignore[misc]

    def set_pruning(self, cfg: PruneConfig | dict | None) -> None:
        """An in-LLM method on (checked against the language model's layers and the largest image's tokens), or off."""
        cfg = as_pruning(cfg)
        if cfg is not None:
            encoder = self.encoder_methods()
            if encoder:
                raise ValueError(
                    f"{cfg.describe()} and {encoder[0]} are both asked for: one method at a time in transformers' "
                    "classes (set_method(...) replaces the one in use)"
                )
            cfg = check_pruning(cfg, self.config.text_config, self.largest_image_tokens())
        setattr(self.config, PRUNING_KEY, None if cfg is None else cfg.to_dict())

    def encoder_methods(self) -> list[Any]:
        """The encoder-side methods in use (VisionZip's budget or a selection), refused beside an in-LLM method."""
        encoder = super().method_config  # type: ignore[misc]
        return [] if encoder is None else [encoder]

    def pruning_report(self) -> list[tuple[float, float] | None]:
        """Per row of the last pruned prefill, the layer-average of its image tokens (inputs, outputs) or None
        (:meth:`~visionzip.hf.pruned.decoder.PrunedDecoderMixin.pruning_report`)."""
        return self.model.language_model.pruning_report()  # type: ignore[attr-defined]

    def largest_image_tokens(self) -> int:
        """Vanilla tokens of the largest image: one view's patches ([CLS] too with the "full" strategy) times the
        views (:meth:`largest_image_views`)."""
        vision = self.config.vision_config
        per_view = (vision.image_size // vision.patch_size) ** 2
        per_view += int(getattr(self.config, "vision_feature_select_strategy", "default") == "full")
        return per_view * self.largest_image_views()

    def largest_image_views(self) -> int:
        """Views of the largest image (LLaVA-1.5: one)."""
        return 1

    def set_visionzip(self, cfg: Any) -> None:
        self._refuse_beside_pruning(cfg, "VisionZip")
        super().set_visionzip(cfg)  # type: ignore[misc]

    def set_selection(self, cfg: Any) -> None:
        self._refuse_beside_pruning(cfg, "a token selection")
        super().set_selection(cfg)  # type: ignore[misc]

    def _refuse_beside_pruning(self, cfg: Any, what: str) -> None:
        if cfg is not None and self.pruning_config is not None:
            raise ValueError(
                f"{what} and {self.pruning_config.describe()} are both asked for: one method at a time in "
                "transformers' classes (set_method(...) replaces the one in use)"
            )


__all__ = [
    "PRUNING_KEY",
    "PruningModelMixin",
    "PruningPretrainedMixin",
    "VideoPruningModelMixin",
    "as_pruning",
    "image_ids_from_mask",
    "is_pruning",
    "pruned_decoder_class",
    "run_ids",
    "saved_pruning",
]
