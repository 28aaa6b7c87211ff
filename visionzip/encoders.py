"""The encoder seam: where an encoder family keeps its layers and attention, and the registry that finds it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionParts:
    """What the method needs from one attention module: its query/key projections and head layout."""

    q_proj: nn.Module  # (B, N, C) -> (B, N, H * Dh)
    k_proj: nn.Module  # (B, N, C) -> (B, N, H * Dh)
    num_heads: int
    scale: float


class EncoderAdapter(Protocol):
    """A vision encoder seen as: embed, then a stack of layers, each with one attention module."""

    has_cls: bool

    @property
    def layers(self) -> nn.ModuleList: ...

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, C) input of the first layer."""
        ...

    def run_layer(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C) output of layer ``index``."""
        ...

    def attention(self, index: int) -> AttentionParts:
        """Query/key projections of layer ``index``."""
        ...


class ViTAdapter:
    """transformers' ``CLIPVisionModel`` (has [CLS]) and ``SiglipVisionModel`` (no [CLS]), matched by class.

    Both expose ``embeddings``, ``encoder.layers[i].self_attn.{q_proj,k_proj}``; CLIP adds ``pre_layrnorm``.
    """

    def __init__(self, model: nn.Module, has_cls: bool) -> None:
        self.model = model
        self.has_cls = has_cls

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layers

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embeddings(pixel_values)  # (B, N, C)
        pre_norm = getattr(self.model, "pre_layrnorm", None)
        return pre_norm(hidden) if pre_norm is not None else hidden

    def run_layer(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        # Vision encoders attend over all tokens: no mask.
        return self.layers[index](hidden_states, None)

    def attention(self, index: int) -> AttentionParts:
        attn = self.layers[index].self_attn
        return AttentionParts(q_proj=attn.q_proj, k_proj=attn.k_proj, num_heads=attn.num_heads, scale=attn.scale)


_REGISTRY: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], EncoderAdapter]]] = []


def register_adapter(
    matches: Callable[[nn.Module], bool], factory: Callable[[nn.Module], EncoderAdapter], first: bool = True
) -> None:
    """Teach :func:`get_adapter` a new encoder family (checked before the built-in ones when ``first``)."""
    entry = (matches, factory)
    if first:
        _REGISTRY.insert(0, entry)
    else:
        _REGISTRY.append(entry)


@functools.cache
def _vit_families() -> tuple[tuple[tuple[type, ...], bool], ...]:
    """transformers' ViT encoder classes, each family with whether it has [CLS]; () without transformers.

    Imported on the first lookup, not at module level, so that ``import visionzip`` needs only torch.
    """
    try:
        from transformers import (
            CLIPModel,
            CLIPVisionModel,
            CLIPVisionModelWithProjection,
            SiglipModel,
            SiglipVisionModel,
        )
    except ImportError:
        return ()
    clip = (CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel)
    return (clip, True), ((SiglipVisionModel, SiglipModel), False)


def _vit_core(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings`` and ``encoder``: ``CLIPModel``, ``CLIPVisionModelWithProjection`` and
    ``SiglipModel`` keep it as ``vision_model`` (and transformers 4's ``CLIPVisionModel`` one level further)."""
    while not hasattr(model, "encoder") and isinstance(getattr(model, "vision_model", None), nn.Module):
        model = model.vision_model
    return model


def _vit_adapter(model: nn.Module) -> ViTAdapter | None:
    """A :class:`ViTAdapter` when ``model`` is (a subclass of) one of transformers' CLIP / SigLIP classes; a class
    of another library that happens to share the name (vLLM's ``CLIPVisionModel``) is not one."""
    for classes, has_cls in _vit_families():
        if isinstance(model, classes):
            return ViTAdapter(_vit_core(model), has_cls)
    return None


def _is_vit(model: nn.Module) -> bool:
    return _vit_adapter(model) is not None


def _make_vit(model: nn.Module) -> EncoderAdapter:
    adapter = _vit_adapter(model)
    if adapter is None:
        raise ValueError(f"{type(model).__qualname__} is not one of transformers' CLIP / SigLIP vision classes")
    return adapter


register_adapter(_is_vit, _make_vit, first=False)


def get_adapter(model: nn.Module) -> EncoderAdapter:
    """The adapter for ``model``; ValueError if no registered family matches."""
    for matches, factory in _REGISTRY:
        if matches(model):
            return factory(model)
    kind = type(model)
    raise ValueError(
        f"no VisionZip adapter for {kind.__qualname__} (from {kind.__module__}): expected one of transformers' CLIP "
        "or SigLIP vision classes (or a subclass); register one with visionzip.encoders.register_adapter"
    )


def tokens_per_view(vision_config: Any, has_cls: bool) -> int:
    """Encoder tokens of one view: (image_size // patch_size)**2 patches, plus [CLS] for encoders with one.

    ``vision_config``: any config with ``image_size`` and ``patch_size`` (transformers' and vLLM's hf configs).
    """
    return (vision_config.image_size // vision_config.patch_size) ** 2 + int(has_cls)


__all__ = ["AttentionParts", "EncoderAdapter", "ViTAdapter", "get_adapter", "register_adapter", "tokens_per_view"]
