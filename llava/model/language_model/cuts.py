"""One cut of the rows between two decoder layers: it lives in :mod:`visionzip.hf.pruned.cuts` (shared with the
subclasses of transformers' LLaVA classes)."""

from __future__ import annotations

from visionzip.hf.pruned.cuts import Tokens, attention_rows, mark_raters, renumbered, sparsevlm_cut, topk_cut

__all__ = ["Tokens", "attention_rows", "mark_raters", "renumbered", "sparsevlm_cut", "topk_cut"]
