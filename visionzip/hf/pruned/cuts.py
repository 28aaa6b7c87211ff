"""One cut of the rows between two decoder layers: score the image tokens, keep some, lay the rows out again.

Two kinds: top-k per image from one query row (FastV, PDrop), and SparseVLM's rank-based count from its raters' rows
with recycled clusters. Used by the owned decoder loop (:mod:`visionzip.hf.pruned.decoder`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from visionzip.baselines import head_mean_attention, keep_top_per_image, rotate
from visionzip.baselines.sparsevlm import SparseVLMConfig, cluster_merge, rater_mask, recycle_count

FIELDS = ("hidden", "positions", "mask", "image_ids", "index", "raters")


@dataclass
class Tokens:
    """The rows as the current layer sees them (all (B, N, ...), left-padded after a cut)."""

    hidden: torch.Tensor  # (B, N, C)
    positions: torch.Tensor  # (B, N) int64
    mask: torch.Tensor  # (B, N) bool real tokens
    image_ids: torch.Tensor  # (B, N) int64 image of each token, -1 for text and padding
    index: torch.Tensor  # (B, N) int64 column in the input, -1 for padding added by a cut and recycled tokens
    raters: torch.Tensor  # (B, N) bool SparseVLM's rater tokens (all False for the other methods)


def last_real(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) bool -> (B,) the index of each row's last real token (the last prompt token that scores)."""
    return (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)


def repack(tokens: Tokens, kept: torch.Tensor) -> Tokens:
    """Cut each row to its kept tokens, in order, left-padded to the longest row. kept: (B, N) bool."""
    length = int(kept.sum(dim=1).max())
    order = kept.long().argsort(dim=1, stable=True)[:, -length:]  # (B, N'): dropped ones first, kept in order
    real = kept.gather(1, order)

    def take(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return x.gather(1, order)

    out = Tokens(**{name: take(getattr(tokens, name)) for name in FIELDS})
    return _mark_padding(out, real)


def _mark_padding(tokens: Tokens, real: torch.Tensor) -> Tokens:
    tokens.mask = tokens.mask & real
    tokens.image_ids = tokens.image_ids.masked_fill(~real, -1)
    tokens.index = tokens.index.masked_fill(~real, -1)
    tokens.raters = tokens.raters & real
    return tokens


def stack_left(rows: list[dict[str, torch.Tensor]]) -> Tokens:
    """Rows of different lengths ({field: (n, ...)}) -> one left-padded :class:`Tokens` (padding: not real)."""
    length = max(row["mask"].shape[0] for row in rows)
    out = {name: rows[0][name].new_zeros((len(rows), length, *rows[0][name].shape[1:])) for name in FIELDS}
    real = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0]["mask"].device)
    for b, row in enumerate(rows):
        start = length - row["mask"].shape[0]
        real[b, start:] = True
        for name in FIELDS:
            out[name][b, start:] = row[name]
    return _mark_padding(Tokens(**out), real)


def renumbered(tokens: Tokens) -> torch.Tensor:
    """(B, N) consecutive positions over each row's real tokens, from the row's first position."""
    big = torch.iinfo(torch.long).max
    first = tokens.positions.masked_fill(~tokens.mask, big).min(dim=1, keepdim=True).values  # (B, 1)
    first = first.masked_fill(first == big, 0)
    return (tokens.mask.long().cumsum(dim=1) - 1).clamp(min=0) + first


def attention_rows(
    scorer: nn.Module, hidden: torch.Tensor, tokens: Tokens, rope, queries: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """(B, Q, N) head-mean attention of the ``queries`` tokens over the current tokens, from ``scorer``'s own norm
    and q/k projections at the current positions (what its eager map holds in those rows; no N x N map).

    Args:
        scorer: a decoder layer (``input_layernorm``, ``self_attn.{q_proj,k_proj,head_dim,scaling}``).
        hidden: (B, N, C) its input. rope: (cos, sin), each (B, N, D).
        queries: (B, Q) int64 indices of the query tokens; valid: (B, Q) bool, which are real queries.
    """
    batch, length = hidden.shape[:2]
    attn, x = scorer.self_attn, scorer.input_layernorm(hidden)  # (B, N, C)
    cos, sin = rope
    picked = x.gather(1, queries.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, Q, C)
    query = attn.q_proj(picked).view(batch, queries.shape[1], -1, attn.head_dim).transpose(1, 2)  # (B, H, Q, D)
    keys = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)  # (B, Hkv, N, D)

    def at_queries(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, queries.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # (B, Q, D)

    query, keys = rotate(query, at_queries(cos), at_queries(sin)), rotate(keys, cos, sin)
    causal = torch.arange(length, device=x.device) <= queries.unsqueeze(-1)  # (B, Q, N)
    allowed = causal & tokens.mask.unsqueeze(1) & valid.unsqueeze(-1)
    return head_mean_attention(query, keys, allowed, attn.scaling)


def topk_cut(scorer: nn.Module, hidden: torch.Tensor, tokens: Tokens, rope, keep: list[dict]) -> Tokens | None:
    """FastV / PDrop: each image keeps its ``keep`` tokens the last prompt token attends to most; None: no change."""
    query = last_real(tokens.mask).unsqueeze(1)  # (B, 1)
    scores = attention_rows(scorer, hidden, tokens, rope, query, torch.ones_like(query, dtype=torch.bool))[:, 0]
    kept = keep_top_per_image(scores, tokens.image_ids, keep)
    return None if bool(kept.all()) else repack(tokens, kept)


def mark_raters(tokens: Tokens) -> Tokens:
    """SparseVLM's raters from the first layer's input: per row, the real text after its first image token."""
    raters = torch.zeros_like(tokens.mask)
    for b in range(tokens.mask.shape[0]):
        image = tokens.image_ids[b] >= 0
        if not bool(image.any()):
            continue
        after = torch.arange(image.shape[0], device=image.device) > image.nonzero()[0, 0]
        raters[b] = rater_mask(tokens.hidden[b], image, tokens.mask[b] & ~image & after)
    return dataclasses.replace(tokens, raters=raters)


def sparsevlm_cut(cfg: SparseVLMConfig, layer: nn.Module, hidden_in: torch.Tensor, tokens: Tokens, rope):
    """SparseVLM v1 after ``layer`` (scored by its attention on ``hidden_in``); ``tokens`` hold its output.
    Returns the new rows, or None when no image of any row is cut (every P has full column rank)."""
    count = int(tokens.raters.sum(dim=1).max())
    if count == 0:
        return None
    queries = tokens.raters.long().argsort(dim=1, descending=True, stable=True)[:, :count]  # (B, R) raters first
    valid = tokens.raters.gather(1, queries)
    rows_p = attention_rows(layer, hidden_in, tokens, rope, queries, valid)  # (B, R, N)
    rows, changed = [], False
    for b in range(tokens.mask.shape[0]):
        row, cut = _sparse_row(cfg, rows_p[b][valid[b]], tokens, b)
        rows.append(row)
        changed |= cut
    return stack_left(rows) if changed else None


def _sparse_row(cfg: SparseVLMConfig, scores: torch.Tensor, tokens: Tokens, b: int) -> tuple[dict, bool]:
    """One row after a SparseVLM cut: its fields ({name: (n', ...)}), and whether anything changed."""
    ids, keep, inserts = tokens.image_ids[b], torch.ones_like(tokens.mask[b]), {}
    for image in ids[ids >= 0].unique().tolist():
        cols = (ids == image).nonzero().squeeze(1)  # (V,)
        p = scores[:, cols]  # (R, V)
        kept = cfg.keep_count(int(torch.linalg.matrix_rank(p.float())), cols.numel()) if p.shape[0] else None
        if kept is None:
            continue
        deleted = cols[p.mean(dim=0).argsort(descending=True, stable=True)[kept:]]  # by score, highest first
        keep[deleted] = False
        if cfg.recycle:
            recycled = deleted[: recycle_count(deleted.numel(), cfg.recycle_ratio)]
            generator = torch.Generator(device=tokens.hidden.device).manual_seed(cfg.seed)
            merged, centres = cluster_merge(
                tokens.hidden[b, recycled], int(recycled.numel() * cfg.cluster_ratio) + 1, generator
            )
            inserts[int(cols.max())] = (merged, image, tokens.positions[b, recycled[centres]])
    fields = {name: getattr(tokens, name)[b] for name in FIELDS}
    if keep.all():
        return fields, False
    pieces, start = [], 0
    for end in sorted({*inserts, keep.shape[0] - 1}):
        span = torch.arange(start, end + 1, device=keep.device)
        span = span[keep[span]]
        pieces.append({name: value[span] for name, value in fields.items()})
        if end in inserts:
            merged, image, positions = inserts[end]
            pieces.append(_recycled_fields(merged, image, positions))
        start = end + 1
    return {name: torch.cat([piece[name] for piece in pieces]) for name in FIELDS}, True


def _recycled_fields(merged: torch.Tensor, image: int, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    n = merged.shape[0]
    flags = torch.zeros(n, dtype=torch.bool, device=merged.device)
    return {
        "hidden": merged,
        "positions": positions,
        "mask": ~flags,
        "image_ids": torch.full_like(positions, image),
        "index": torch.full_like(positions, -1),
        "raters": flags,
    }
