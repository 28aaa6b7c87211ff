"""The encoder seam: where an encoder family keeps its layers and attention, and the registry that finds it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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
    """transformers' ``CLIPVisionModel`` (has [CLS]) and ``SiglipVisionModel`` (no [CLS]).

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


def _class_names(model: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(model).__mro__}


def _unwrap(model: nn.Module) -> nn.Module:
    """``CLIPModel``/``CLIPVisionModelWithProjection``/``SiglipModel`` hold the encoder as ``vision_model``."""
    inner = getattr(model, "vision_model", None)
    return inner if isinstance(inner, nn.Module) else model


register_adapter(lambda m: "CLIPVisionModel" in _class_names(_unwrap(m)), lambda m: ViTAdapter(_unwrap(m), True), False)
register_adapter(
    lambda m: "SiglipVisionModel" in _class_names(_unwrap(m)), lambda m: ViTAdapter(_unwrap(m), False), False
)


def get_adapter(model: nn.Module) -> EncoderAdapter:
    """The adapter for ``model``; ValueError if no registered family matches."""
    for matches, factory in _REGISTRY:
        if matches(model):
            return factory(model)
    raise ValueError(
        f"no VisionZip adapter for {type(model).__name__}; register one with visionzip.encoders.register_adapter"
    )


__all__ = ["AttentionParts", "EncoderAdapter", "ViTAdapter", "get_adapter", "register_adapter"]
