"""The seam between the method and an encoder family: where the layers are and how one layer runs."""

from __future__ import annotations

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
