"""A slow, loop-based restatement of VisionZip's released algorithm, used only as the tests' reference."""

from __future__ import annotations

import torch

from visionzip import VisionZipConfig


def _top(scores: list[float], candidates: range, count: int) -> list[int]:
    return sorted(sorted(candidates, key=lambda i: -scores[i])[:count])


def _nearest_target(key: torch.Tensor, target_keys: list[torch.Tensor]) -> int:
    sims = [float(torch.dot(key, t) / (key.norm() * t.norm())) for t in target_keys]
    return sims.index(max(sims))  # first maximum, as argmax


def _reference_one(hidden: torch.Tensor, scores: list[float], keys: torch.Tensor, cfg: VisionZipConfig):
    n = hidden.shape[0]
    if cfg.cls_token:
        keep = sorted([0, *_top(scores, range(1, n), cfg.dominant - 1)])
    else:
        keep = _top(scores, range(n), cfg.dominant)
    rows = [hidden[i] for i in keep]
    rest = [i for i in range(n) if i not in keep]
    if cfg.contextual:
        step = max(1, len(rest) // cfg.contextual)
        targets = rest[::step][: cfg.contextual]
        members: dict[int, list[int]] = {t: [] for t in targets}
        for i in rest:
            if i not in members:
                members[targets[_nearest_target(keys[i], [keys[t] for t in targets])]].append(i)
        for t in targets:
            assigned = [hidden[i] for i in members[t]]
            if cfg.merge == "paper":
                rows.append(hidden[t] + (sum(assigned) / len(assigned) if assigned else 0))
            else:
                rows.append((hidden[t] + sum(assigned)) / (1 + len(assigned)))
    return torch.stack(rows), keep


def reference_compress(hidden: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, cfg: VisionZipConfig):
    """Same contract as ``visionzip.compress`` but per image, with Python lists, in float64."""
    outs, keeps = [], []
    for b in range(hidden.shape[0]):
        out, keep = _reference_one(hidden[b].double(), scores[b].double().tolist(), keys[b].double(), cfg)
        outs.append(out)
        keeps.append(keep)
    return torch.stack(outs).to(hidden.dtype), keeps


def eager_reference(model_eager, pixel_values: torch.Tensor, cfg: VisionZipConfig):
    """The released code's path: eager attention maps of every layer, keys recomputed from the layer's input.

    Returns ``(tokens, keep)`` from the full (B, H, N, N) attention map of the scoring layer (``cfg.score_layer``,
    else ``cfg.layer``) and the hidden states of ``cfg.layer``.
    """
    out = model_eager(pixel_values, output_attentions=True, output_hidden_states=True)
    layers = model_eager.encoder.layers
    index = cfg.resolve_score_layer(len(layers))
    feature = cfg.resolve_layer(len(layers))
    attn = out.attentions[index]  # (B, H, N, N)
    scores = attn[:, :, 0, :].sum(dim=1) if cfg.cls_token else attn.mean(dim=(1, 2))  # (B, N)
    layer = layers[index]
    normed = layer.layer_norm1(out.hidden_states[index])  # the layer's input, normalised as it does
    b, n, _ = normed.shape
    keys = layer.self_attn.k_proj(normed).view(b, n, layer.self_attn.num_heads, -1).mean(dim=2)
    return reference_compress(out.hidden_states[feature + 1], scores, keys, cfg), attn


def reference_content_seed(row: torch.Tensor, seed: int) -> int:
    """``visionzip.core.content_seeds`` for one row, restated byte by byte with Python integers.

    seed * P + (sum over the row's bytes b_i, i = 1, 2, ..., of b_i * w_i) mod P, with P = 2**31 - 1 and
    w_i = ((i * 48271) mod P)**2 mod P.
    """
    prime = 2**31 - 1
    data = row.detach().contiguous().cpu().reshape(-1).view(torch.uint8).tolist()
    total = sum(byte * ((i * 48271 % prime) ** 2 % prime) for i, byte in enumerate(data, start=1))
    return seed * prime + total % prime
