"""LLaVA's vision-language projector: ``linear``, ``mlp{N}x_gelu`` or ``identity``."""

from __future__ import annotations

import re

from torch import nn


def build_vision_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """The projector as LLaVA names its weights: ``mlp2x_gelu`` is Sequential(Linear, GELU, Linear) -> keys 0 and 2."""
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    if projector_type == "identity":
        if mm_hidden_size != hidden_size:
            raise ValueError(
                f"identity projector needs mm_hidden_size == hidden_size, got {mm_hidden_size}, {hidden_size}"
            )
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match is None:
        raise ValueError(f"unknown mm_projector_type {projector_type!r}: expected linear, mlp<N>x_gelu or identity")
    layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)
