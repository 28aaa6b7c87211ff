"""VisionZip on vLLM's own CLIP tower: the budget from the hf config, its checks, and the compressed tokens per view.

Imports nothing from vLLM: the tower is passed in. Every layer runs with vLLM's attention backend; at the scoring
layer a forward hook on that layer's ``qkv_proj`` (removed on exit) takes the query and key projections, from which
:mod:`visionzip.capture` computes the [CLS] row of the attention (no N x N map) and the head-mean keys; then
:func:`visionzip.core.compress` (paper Sec. 3).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from visionzip.capture import capture_outputs, cls_scores, head_mean_keys
from visionzip.config import VisionZipConfig
from visionzip.core import compress
from visionzip.encoders import tokens_per_view
from visionzip.hf.common import check_feature_layer, saved_visionzip

CLIP_TYPE = "clip_vision_model"


def checked_budget(hf_config: Any) -> VisionZipConfig | None:
    """The budget saved in the model's hf config (``visionzip``), checked against its tower; None when absent.

    Raises ValueError (at engine startup, where vLLM builds the processor and the model) for a budget this model
    cannot take: a tower other than CLIP, a layer other than ``vision_feature_layer``, a scoring layer after it,
    more tokens than a view has, ``positions`` other than ``"packed"`` or ``selection`` other than attention.
    """
    cfg = saved_visionzip(hf_config)
    if cfg is None:
        return None
    vision = hf_config.vision_config
    if vision.model_type != CLIP_TYPE:
        raise ValueError(f"VisionZip in vLLM takes a CLIP tower ({CLIP_TYPE}), got {vision.model_type!r}")
    if cfg.positions != "packed" or cfg.selection != "attention" or not cfg.cls_token:
        raise ValueError(
            "VisionZip in vLLM takes positions='packed', selection='attention', cls_token=True; got "
            f"positions={cfg.positions!r}, selection={cfg.selection!r}, cls_token={cfg.cls_token}"
        )
    layers = vision.num_hidden_layers
    check_feature_layer(cfg, hf_config.vision_feature_layer, layers)
    if cfg.resolve_score_layer(layers) > cfg.resolve_layer(layers):
        raise ValueError(
            f"VisionZip score_layer={cfg.score_layer} comes after layer={cfg.layer}: vLLM builds the tower only up "
            "to the feature layer"
        )
    cfg.check_fits(tokens_per_view(vision, has_cls=True))
    return cfg


def encode_views(
    tower: nn.Module, pixel_values: torch.Tensor, cfg: VisionZipConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress each view with VisionZip on vLLM's ``CLIPVisionModel`` (built up to the feature layer).

    Args:
        tower: vLLM's ``CLIPVisionModel`` of the LLaVA model (``num_hidden_layers_override`` = feature layer + 1).
        pixel_values: (V, 3, S, S) views.
        cfg: a budget from :func:`checked_budget`.

    Returns:
        tokens: (V, dominant + contextual, C_vision), dominant ones in ascending position ([CLS] first), then
            contextual ones.
        keep: (V, dominant) ascending encoder positions of the dominant tokens.
    """
    encoder = tower.vision_model.encoder
    num_layers = tower.vision_model.config.num_hidden_layers
    feature_layer = cfg.resolve_layer(num_layers)
    if len(encoder.layers) != feature_layer + 1:
        raise ValueError(f"expected a tower built up to layer {feature_layer}, got {len(encoder.layers)} layers")
    attention = encoder.layers[cfg.resolve_score_layer(num_layers)].self_attn
    with capture_outputs(qkv=attention.qkv_proj) as seen:
        features = tower(pixel_values, feature_select_strategy="full")  # (V, N, C): output of the feature layer
    qkv = seen["qkv"][0] if isinstance(seen["qkv"], tuple) else seen["qkv"]  # vLLM's linear layers return (out, bias)
    queries, keys, _ = qkv.chunk(3, dim=-1)  # (V, N, H * Dh) each
    heads = attention.num_heads_per_partition
    scores = cls_scores(queries, keys, heads, attention.scale)  # (V, N)
    return compress(features, scores, head_mean_keys(keys, heads), cfg)
