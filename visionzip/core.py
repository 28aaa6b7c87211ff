"""The VisionZip method on tensors: select dominant tokens, merge the rest into contextual ones (paper Sec. 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visionzip.config import VisionZipConfig


def _check_inputs(hidden_states: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor) -> None:
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be (B, N, C), got shape {tuple(hidden_states.shape)}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    if keys.dim() != 3:
        raise ValueError(f"keys must be (B, N, D), got shape {tuple(keys.shape)}")
    b, n, _ = hidden_states.shape
    if tuple(scores.shape) != (b, n):
        raise ValueError(f"scores shape {tuple(scores.shape)} does not match hidden_states (B, N) = {(b, n)}")
    if tuple(keys.shape[:2]) != (b, n):
        raise ValueError(f"keys shape {tuple(keys.shape)} does not match hidden_states (B, N) = {(b, n)}")


def _top_positions(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` highest scores per row, equal scores taken in ascending position.

    A stable descending sort instead of ``topk``, whose choice among equal scores is unspecified and differs
    between devices: with ties (common in fp16/bf16) the kept tokens would depend on the hardware.
    """
    return scores.sort(dim=1, descending=True, stable=True).indices[:, :count]  # (B, count)


def select_dominant(scores: torch.Tensor, dominant: int, cls_token: bool = True) -> torch.Tensor:
    """Indices of the dominant tokens (paper Sec. 3.2), ascending.

    Args:
        scores: (B, N) importance of each token; with ``cls_token`` position 0 is [CLS] and its score is ignored.
        dominant: tokens to keep; with ``cls_token`` this includes [CLS], which is always kept.
        cls_token: whether position 0 is a [CLS] token.

    Returns:
        (B, dominant) int64 positions in ascending (raster) order; with ``cls_token`` column 0 is 0. Among equal
        scores the lower position is kept.
    """
    b = scores.shape[0]
    scores = scores.float()
    if cls_token:
        top = _top_positions(scores[:, 1:], dominant - 1) + 1  # (B, dominant-1)
        keep = torch.cat([torch.zeros(b, 1, dtype=top.dtype, device=top.device), top], dim=1)
    else:
        keep = _top_positions(scores, dominant)  # (B, dominant)
    return keep.sort(dim=1).values


def remaining_indices(keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Positions not in ``keep``, ascending: (B, K) -> (B, num_tokens - K). No host synchronisation."""
    b, k = keep.shape
    kept = torch.zeros(b, num_tokens, dtype=torch.int8, device=keep.device)
    kept.scatter_(1, keep, 1)
    # A stable sort puts the 0s (not kept) first, in their original ascending order.
    return kept.argsort(dim=1, stable=True)[:, : num_tokens - k]


def target_positions(num_remaining: int, contextual: int, device: torch.device | None = None) -> torch.Tensor:
    """Merge targets among the remaining tokens: a uniform stride ``max(1, R // contextual)``, first ``contextual``."""
    step = max(1, num_remaining // contextual)
    return torch.arange(0, num_remaining, step, device=device)[:contextual]


def contextual_targets(keep: torch.Tensor, num_tokens: int, contextual: int) -> torch.Tensor:
    """Encoder positions of the contextual tokens' merge targets (paper Sec. 3.3), as :func:`compress` picks them.

    Args:
        keep: (B, D) ascending dominant positions (:func:`select_dominant`).
        num_tokens: N, encoder tokens per image.
        contextual: T, contextual tokens (0 <= T <= N - D).

    Returns:
        (B, T) int64: column t is the position, among all N tokens, of the target contextual token t is built on.
    """
    rest = remaining_indices(keep, num_tokens)  # (B, R)
    if contextual == 0:
        return rest[:, :0]
    return rest[:, target_positions(rest.shape[1], contextual, keep.device)]  # (B, T)


def token_positions(keep: torch.Tensor, num_tokens: int, contextual: int) -> torch.Tensor:
    """Encoder position each output token of :func:`compress` stands at: dominant ones their own, contextual ones
    their target's (the ``positions="original"`` option of :class:`VisionZipConfig`).

    Args:
        keep: (B, D) the dominant positions :func:`compress` returned.
        num_tokens: N, encoder tokens per image.
        contextual: T, contextual tokens.

    Returns:
        (B, D + T) int64, aligned with the tokens :func:`compress` returns.
    """
    return torch.cat([keep, contextual_targets(keep, num_tokens, contextual)], dim=1)


def contextual_assignment(keys: torch.Tensor, contextual: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which contextual token each remaining token is merged into (paper Sec. 3.3).

    Targets are taken at a uniform stride (:func:`target_positions`); every other token joins the target whose key
    has the highest cosine similarity with its own (first target on ties).

    Args:
        keys: (B, R, D) head-averaged keys of the remaining tokens, in ascending position order.
        contextual: T, number of targets, 1 <= T <= R.

    Returns:
        targets: (T,) positions of the targets among the R remaining tokens.
        others: (R - T,) positions of the other remaining tokens.
        assign: (B, R - T) int64, the target (0..T-1) each of ``others`` joins.
    """
    r = keys.shape[1]
    targets = target_positions(r, contextual, keys.device)  # (T,)
    is_target = torch.zeros(r, dtype=torch.bool, device=keys.device)
    is_target[targets] = True
    others = (~is_target).nonzero().squeeze(1)  # (R-T,)
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)  # (B, R, D)
    similarity = unit[:, others] @ unit[:, targets].transpose(1, 2)  # (B, R-T, T)
    return targets, others, similarity.argmax(dim=2)


def merge_contextual(
    hidden_states: torch.Tensor, keys: torch.Tensor, contextual: int, merge: str = "paper"
) -> torch.Tensor:
    """Merge the remaining tokens into ``contextual`` tokens by key similarity (paper Sec. 3.3).

    The groups are :func:`contextual_assignment`'s: a target and the tokens assigned to it.

    Args:
        hidden_states: (B, R, C) remaining tokens, in ascending position order.
        keys: (B, R, D) their head-averaged keys.
        contextual: number of output tokens, 0 <= contextual <= R.
        merge: ``"paper"``: target + mean(assigned) (a target with none assigned stays itself);
            ``"mean"``: (target + sum(assigned)) / (1 + count).

    Returns:
        (B, contextual, C) in the dtype of ``hidden_states`` (sums are accumulated in fp32).
    """
    b, r, c = hidden_states.shape
    if contextual == 0:
        return hidden_states.new_zeros(b, 0, c)
    if contextual > r:
        raise ValueError(f"cannot merge {r} remaining tokens into contextual={contextual} tokens")
    targets, others, assign = contextual_assignment(keys, contextual)  # (T,), (R-T,), (B, R-T)

    members = hidden_states[:, others].float()  # (B, R-T, C)
    sums = members.new_zeros(b, contextual, c).scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, c), members)
    counts = members.new_zeros(b, contextual).scatter_add_(1, assign, members.new_ones(assign.shape))
    target_states = hidden_states[:, targets].float()  # (B, T, C)
    if merge == "paper":
        merged = target_states + sums / counts.clamp(min=1).unsqueeze(-1)
    elif merge == "mean":
        merged = (target_states + sums) / (counts + 1).unsqueeze(-1)
    else:
        raise ValueError(f"merge must be 'paper' or 'mean', got {merge!r}")
    return merged.to(hidden_states.dtype)


_HASH_PRIME = 2**31 - 1  # content hashes live in [0, _HASH_PRIME)
_HASH_MULTIPLIER = 48_271  # MINSTD's multiplier: distinct byte weights for rows up to 2**31 - 2 bytes


def content_seeds(content: torch.Tensor, seed: int) -> list[int]:
    """One generator seed per row of ``content``, from ``seed`` and the exact bytes of that row only.

    The hash is a weighted sum of the row's bytes modulo a prime, in int64 on the tensor's own device: integer
    sums do not depend on the order of reduction, so it is the same on CPU and GPU, alone or in any batch.
    Equal rows in the same dtype get equal seeds; a change in any byte changes the seed (up to collisions,
    about one in 2**31).

    Args:
        content: (B, ...) what identifies each image, e.g. its pixel values.
        seed: the config's seed, 0 <= seed < 2**32.

    Returns:
        B Python ints below 2**64.
    """
    rows = content.detach().reshape(content.shape[0], -1).contiguous()
    data = rows.view(torch.uint8).long()  # (B, M) bytes
    position = torch.arange(1, data.shape[1] + 1, device=data.device, dtype=torch.long)
    weight = (position * _HASH_MULTIPLIER) % _HASH_PRIME
    weight = (weight * weight) % _HASH_PRIME  # (M,) squared: not linear in the position
    hashes = ((data * weight) % _HASH_PRIME).sum(dim=1) % _HASH_PRIME  # (B,)
    return [seed * _HASH_PRIME + h for h in hashes.tolist()]


def random_scores(num_tokens: int, seeds: list[int], device: torch.device | None = None) -> torch.Tensor:
    """Uniform random scores (B, num_tokens), row b drawn from its own generator seeded with ``seeds[b]``.

    The draws come from CPU generators, so a row is the same on every device and in every batch.
    """
    rows = [torch.rand(num_tokens, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(rows).to(device) if rows else torch.zeros(0, num_tokens, device=device)  # (B, num_tokens)


def _dominant(scores: torch.Tensor, cfg: VisionZipConfig, content: torch.Tensor | None) -> torch.Tensor:
    """(B, N) scores -> (B, dominant) kept positions: by score, or drawn per ``content`` row (random selection)."""
    if cfg.selection == "random":
        if content is None:
            raise ValueError("VisionZip selection='random' draws per image: expected the images' content, got None")
        scores = random_scores(scores.shape[1], content_seeds(content, cfg.seed), scores.device)  # (B, N)
    return select_dominant(scores, cfg.dominant, cfg.cls_token)


def compress(
    hidden_states: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    cfg: VisionZipConfig,
    content: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on tensors: dominant tokens, then contextual tokens (paper Sec. 3).

    Args:
        hidden_states: (B, N, C) output of encoder layer ``cfg.layer``; with ``cfg.cls_token`` position 0 is [CLS].
        scores: (B, N) attention score per token (see :func:`visionzip.capture.cls_scores` and
            :func:`visionzip.capture.received_scores`).
        keys: (B, N, D) keys of that layer averaged over heads.
        cfg: the budget.
        content: (B, ...) what each image's ``selection="random"`` draw depends on, with ``cfg.seed``
            (:func:`content_seeds`); None: ``hidden_states``. Unused by attention selection.

    Returns:
        tokens: (B, cfg.dominant + cfg.contextual, C), dominant tokens in ascending position then contextual.
        keep: (B, cfg.dominant) ascending positions of the dominant tokens.
    """
    _check_inputs(hidden_states, scores, keys)
    n, c = hidden_states.shape[1:]
    cfg.check_fits(n)
    keep = _dominant(scores, cfg, hidden_states if content is None else content)  # (B, K)
    dominant_states = hidden_states.gather(1, keep.unsqueeze(-1).expand(-1, -1, c))  # (B, K, C)
    if cfg.contextual == 0:
        return dominant_states, keep
    rest = remaining_indices(keep, n)  # (B, R)
    rest_states = hidden_states.gather(1, rest.unsqueeze(-1).expand(-1, -1, c))  # (B, R, C)
    rest_keys = keys.gather(1, rest.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))  # (B, R, D)
    contextual = merge_contextual(rest_states, rest_keys, cfg.contextual, cfg.merge)  # (B, T, C)
    return torch.cat([dominant_states, contextual], dim=1), keep


DOMINANT_GROUP = -1  # Selection.groups: a token kept as a dominant token
DROPPED_GROUP = -2  # Selection.groups: a token neither kept nor merged (contextual=0)


@dataclass
class Selection:
    """Where each encoder token goes under VisionZip: what :func:`compress` keeps and merges, as indices.

    Attributes:
        keep: (B, D) ascending positions kept as dominant tokens (:func:`compress`'s ``keep``).
        targets: (B, T) positions of the contextual tokens' merge targets (:func:`contextual_targets`).
        groups: (B, N) int64 per encoder token: ``DOMINANT_GROUP`` (-1), the contextual token t (0..T-1) it is
            merged into (a target is in its own group), or ``DROPPED_GROUP`` (-2) when ``contextual=0``.
    """

    keep: torch.Tensor
    targets: torch.Tensor
    groups: torch.Tensor


def select(
    scores: torch.Tensor, keys: torch.Tensor, cfg: VisionZipConfig, content: torch.Tensor | None = None
) -> Selection:
    """VisionZip's choice for each token without the tokens themselves: the same steps as :func:`compress`.

    Args:
        scores: (B, N) attention score per token (as for :func:`compress`).
        keys: (B, N, D) head-averaged keys.
        cfg: the budget.
        content: (B, ...) what ``selection="random"`` draws depend on (pass what :func:`compress` was given: the
            pixels in :func:`visionzip.encode.encode`); unused by attention selection.

    Returns:
        :class:`Selection`.
    """
    if scores.dim() != 2 or keys.dim() != 3 or tuple(keys.shape[:2]) != tuple(scores.shape):
        raise ValueError(f"expected scores (B, N) and keys (B, N, D), got {tuple(scores.shape)}, {tuple(keys.shape)}")
    b, n = scores.shape
    cfg.check_fits(n)
    keep = _dominant(scores, cfg, content)  # (B, D)
    groups = torch.full((b, n), DROPPED_GROUP, dtype=torch.long, device=scores.device)
    groups.scatter_(1, keep, DOMINANT_GROUP)
    rest = remaining_indices(keep, n)  # (B, R)
    if cfg.contextual == 0:
        return Selection(keep, rest[:, :0], groups)
    rest_keys = keys.gather(1, rest.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))  # (B, R, D)
    targets, others, assign = contextual_assignment(rest_keys, cfg.contextual)  # (T,), (R-T,), (B, R-T)
    rest_groups = torch.empty_like(rest)  # (B, R): group of each remaining token
    rest_groups[:, targets] = torch.arange(cfg.contextual, device=rest.device)
    rest_groups[:, others] = assign
    groups.scatter_(1, rest, rest_groups)
    return Selection(keep, rest[:, targets], groups)
