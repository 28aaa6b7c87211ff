"""What the in-LLM methods share: picking each image's top tokens from scores, and building a config by name."""

from __future__ import annotations

from typing import Any

import torch

from visionzip.baselines.fastv import FastVConfig
from visionzip.baselines.pdrop import PDropConfig
from visionzip.baselines.sparsevlm import SparseVLMConfig

PruneConfig = FastVConfig | PDropConfig | SparseVLMConfig
METHODS: dict[str, type] = {cls.name: cls for cls in (FastVConfig, PDropConfig, SparseVLMConfig)}


def method_config(name: str, **options: Any) -> PruneConfig:
    """The config of an in-LLM method by name (``fastv``, ``pdrop``, ``sparsevlm``); ValueError naming those known."""
    if name not in METHODS:
        raise ValueError(f"unknown in-LLM method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](**options)


def config_from_dict(data: dict[str, Any]) -> PruneConfig:
    """The inverse of ``to_dict`` (``config.json`` holds ``{"method": name, ...options}``)."""
    options = dict(data)
    name = options.pop("method", None)
    if name is None:
        raise ValueError(f"a saved pruning config needs a 'method' key, got {sorted(data)}")
    if "layers" in options:
        options["layers"] = tuple(options["layers"])
    return method_config(name, **options)


def keep_top_per_image(scores: torch.Tensor, image_ids: torch.Tensor, keep: list[dict[int, int]]) -> torch.Tensor:
    """Which tokens stay: every non-image token, and each image's ``keep`` highest-scoring tokens.

    Args:
        scores: (B, N) a score per token (only image tokens' are read).
        image_ids: (B, N) int64, the image each token belongs to (0, 1, ... within the row), -1 for text and padding.
        keep: per row, {image id: tokens to keep}; an image missing from it keeps all of its tokens.

    Returns:
        (B, N) bool. Ties go to the earlier token (a stable sort), so the choice is deterministic.
    """
    kept = image_ids < 0  # (B, N)
    for row, counts in enumerate(keep):
        for image, count in counts.items():
            where = (image_ids[row] == image).nonzero().squeeze(1)  # (n,)
            if count > where.numel():
                raise ValueError(f"cannot keep {count} tokens of an image that has {where.numel()} in this layer")
            order = scores[row, where].argsort(descending=True, stable=True)[:count]
            kept[row, where[order]] = True
        missing = set(image_ids[row][image_ids[row] >= 0].tolist()) - set(counts)
        for image in missing:
            kept[row] |= image_ids[row] == image
    return kept
