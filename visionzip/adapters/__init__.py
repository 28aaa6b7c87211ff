"""Thin adapters that show the method where an encoder family keeps its layers and attention."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from visionzip.adapters.base import AttentionParts, EncoderAdapter
from visionzip.adapters.clip import ViTAdapter

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
        f"no VisionZip adapter for {type(model).__name__}; register one with visionzip.adapters.register_adapter"
    )


__all__ = ["AttentionParts", "EncoderAdapter", "ViTAdapter", "get_adapter", "register_adapter"]
