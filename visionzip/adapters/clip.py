"""Adapter for transformers' CLIP and SigLIP vision encoders (pre-norm ViTs with q/k/v projections)."""

from __future__ import annotations

import torch
from torch import nn

from visionzip.adapters.base import AttentionParts


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
