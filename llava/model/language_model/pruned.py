"""The owned decoder loop of in-LLM pruning (FastV, PDrop, SparseVLM), as our LLaVA's language models use it: it lives
in :mod:`visionzip.hf.pruned.decoder`, shared with the subclasses of transformers' LLaVA classes."""

from __future__ import annotations

from visionzip.hf.pruned.decoder import (
    PrunedCausalLMMixin,
    PrunedDecoderMixin,
    attention_mask_for,
    check_pruning,
    positions_from_mask,
)

__all__ = ["PrunedCausalLMMixin", "PrunedDecoderMixin", "attention_mask_for", "check_pruning", "positions_from_mask"]
