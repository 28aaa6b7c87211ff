"""Visual tokens per decoder layer, and the layer-average the papers call a method's "budget" (two conventions)."""

from __future__ import annotations

from collections.abc import Mapping


def visual_counts(tokens: int, kept_after: Mapping[int, int], num_layers: int) -> list[int]:
    """How many visual tokens each decoder layer takes as input.

    Args:
        tokens: visual tokens before the first layer (one image's N).
        kept_after: {layer index i (0-based): tokens kept after layer i}, e.g. FastV with K=2 keeping k: {1: k}.
        num_layers: decoder layers L.

    Returns:
        L counts, layer 0 first.
    """
    counts, current = [], tokens
    for layer in range(num_layers):
        counts.append(current)
        current = kept_after.get(layer, current)
    return counts


def layer_average(inputs: list[int]) -> tuple[float, float]:
    """(average over layers of the visual tokens each layer takes in, the same of what each layer puts out).

    The first is FastV's formula T = (K N + (L - K) k) / L; the second is what SparseVLM's code prints (a pruning
    layer counted at its reduced output; the last layer's output is its input). The VisionZip paper's comparison
    rows use the layer average; which of the two is not published, so every run reports both.
    """
    if not inputs:
        raise ValueError("layer_average needs at least one layer")
    outputs = [*inputs[1:], inputs[-1]]
    return sum(inputs) / len(inputs), sum(outputs) / len(outputs)
