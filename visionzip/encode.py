"""Run a vision encoder up to VisionZip's layer and compress its output: the method on a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from visionzip.capture import capture_outputs, cls_scores, head_mean_keys, received_scores
from visionzip.config import VisionZipConfig
from visionzip.core import compress
from visionzip.encoders import get_adapter


@dataclass
class EncodeOutput:
    """Result of :func:`encode`.

    Attributes:
        tokens: (B, dominant + contextual, C) compressed hidden states of layer ``cfg.layer``.
        keep_indices: (B, dominant) ascending positions kept as dominant tokens (0 is [CLS] when it has one).
        num_input_tokens: tokens the encoder produced per image, N.
    """

    tokens: torch.Tensor
    keep_indices: torch.Tensor
    num_input_tokens: int


def run_to_layer(vision_model: nn.Module, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """Hidden states output by encoder layer ``layer`` (negative: from the end); later layers do not run.

    ``layer=-2`` gives the features of LLaVA's ``mm_vision_select_layer=-2``.

    Args:
        pixel_values: (B, 3, H, W).

    Returns:
        (B, N, C).
    """
    adapter = get_adapter(vision_model)
    last = VisionZipConfig(layer=layer).resolve_layer(len(adapter.layers))
    hidden = adapter.embed(pixel_values)
    for index in range(last + 1):
        hidden = adapter.run_layer(index, hidden)
    return hidden


@dataclass
class Captured:
    """What VisionZip needs from an encoder (:func:`capture`), before any budget is applied.

    Attributes:
        features: (B, N, C) hidden states of layer ``cfg.layer``.
        scores: (B, N) attention score per token at ``cfg.score_layer`` ([CLS] row, or attention received).
        keys: (B, N, Dh) keys of that layer averaged over heads.
    """

    features: torch.Tensor
    scores: torch.Tensor
    keys: torch.Tensor


def capture(vision_model: nn.Module, pixel_values: torch.Tensor, cfg: VisionZipConfig) -> Captured:
    """Run the encoder to VisionZip's layer and take its features, scores and keys (paper Sec. 3).

    Every layer runs with the model's own attention implementation (SDPA, FlashAttention, eager); at layer
    ``cfg.layer`` (or ``cfg.score_layer``) forward hooks record the query and key projections, from which the
    scores are computed without an N x N map. Layers after both do not run. Only ``cfg``'s layers,
    ``cls_token`` and ``query_chunk`` are read, so one capture serves any budgets (:func:`compress` each).

    Args:
        vision_model: a transformers ``CLIPVisionModel`` or ``SiglipVisionModel`` (or one registered with
            :func:`visionzip.encoders.register_adapter`).
        pixel_values: (B, 3, H, W).
    """
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
    adapter = get_adapter(vision_model)
    if cfg.cls_token and not adapter.has_cls:
        raise ValueError(f"{type(vision_model).__name__} has no [CLS] token: use VisionZipConfig(cls_token=False)")
    feature_layer = cfg.resolve_layer(len(adapter.layers))
    score_layer = cfg.resolve_score_layer(len(adapter.layers))
    parts = adapter.attention(score_layer)
    hidden = adapter.embed(pixel_values)  # (B, N, C)
    features = hidden
    for index in range(max(feature_layer, score_layer) + 1):
        if index == score_layer:
            with capture_outputs(q=parts.q_proj, k=parts.k_proj) as seen:
                hidden = adapter.run_layer(index, hidden)  # (B, N, C)
        else:
            hidden = adapter.run_layer(index, hidden)
        if index == feature_layer:
            features = hidden
    if cfg.cls_token:
        scores = cls_scores(seen["q"], seen["k"], parts.num_heads, parts.scale)  # (B, N)
    else:
        scores = received_scores(seen["q"], seen["k"], parts.num_heads, parts.scale, cfg.query_chunk)
    return Captured(features, scores, head_mean_keys(seen["k"], parts.num_heads))  # keys: (B, N, Dh)


def encode(vision_model: nn.Module, pixel_values: torch.Tensor, cfg: VisionZipConfig) -> EncodeOutput:
    """Encode images and keep ``cfg.dominant + cfg.contextual`` tokens each (paper Sec. 3): :func:`capture`,
    then :func:`visionzip.core.compress`.

    Args:
        vision_model: see :func:`capture`.
        pixel_values: (B, 3, H, W).
        cfg: the budget; ``cfg.cls_token`` must match the encoder. With ``cfg.selection="random"`` each image's
            draw depends only on ``cfg.seed`` and the exact values of its own ``pixel_values`` row.

    Returns:
        :class:`EncodeOutput`.
    """
    seen = capture(vision_model, pixel_values, cfg)
    tokens, keep = compress(seen.features, seen.scores, seen.keys, cfg, content=pixel_values)  # random: per pixels
    return EncodeOutput(tokens=tokens, keep_indices=keep, num_input_tokens=seen.features.shape[1])
