"""DivPrune, VisPruner and CDPruner (the encoder-side comparison methods) against slow restatements in plain Python.

Each restatement reads the spec (``shared/methods/baselines.md`` sections 5-7) again with lists and loops in float64
(no tensor ops beyond reading the inputs), so an indexing or batching slip in the vectorised code shows as a
different choice. Random inputs are continuous, so ties and fp32/fp64 near-ties do not occur at these sizes.
"""

from __future__ import annotations

import math

import pytest
import torch

from visionzip.baselines import (
    CDPrunerConfig,
    DivPruneConfig,
    VisPrunerConfig,
    cdpruner_kernel,
    cdpruner_relevance,
    cdpruner_select,
    divprune_select,
    vispruner_select,
)
from visionzip.baselines.cdpruner import dpp_greedy_map


def _lists(x: torch.Tensor) -> list:
    return x.double().tolist()


def _cos(u: list[float], v: list[float]) -> float:
    nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(a * a for a in v))
    return sum(a * b for a, b in zip(u, v, strict=True)) / (nu * nv)


# DivPrune, restated: brute-force loops over a distance table.
def divprune_reference(tokens: list[list[float]], keep: int) -> list[int]:
    n = len(tokens)
    dist = [[1 - _cos(tokens[i], tokens[j]) for j in range(n)] for i in range(n)]
    nearest = [min((dist[i][j] for i in range(n) if i != j), default=0.0) for j in range(n)]
    picks = [max(range(n), key=lambda j: nearest[j])]
    while len(picks) < keep:
        rest = [j for j in range(n) if j not in picks]
        picks.append(max(rest, key=lambda j: min(dist[s][j] for s in picks)))
    return sorted(picks)


# VisPruner, restated: Python lists, the spec's procedure step by step.
def vispruner_reference(features: list[list[float]], attention: list[float], keep: int, important: int) -> list[int]:
    n = len(features)
    by_attention = sorted(range(n), key=lambda i: -attention[i])
    chosen, residual = by_attention[:important], by_attention[important:]
    diverse = keep - important
    while diverse > 0 and len(residual) > diverse:
        drop = min(8, len(residual) - diverse)
        a, b = residual[0::2], residual[1::2]
        score = {i: max(_cos(features[i], features[j]) for j in b) for i in a}
        a_sorted = sorted(a, key=lambda i: -score[i])
        residual = a_sorted[drop:] + b
    return sorted(chosen + (residual if diverse > 0 else []))


# CDPruner, restated: r from its definition, then greedy on log det by brute force.
def relevance_reference(image: list[list[float]], text: list[list[float]]) -> list[float]:
    score = [-sum(_cos(v, t) for t in text) / len(text) for v in image]
    low, high = min(score), max(score)
    return [(s - low + 1e-6) / (high - low) for s in score]


def _det(m: list[list[float]]) -> float:
    """Determinant by Gaussian elimination with partial pivoting (float64)."""
    m = [row[:] for row in m]
    det = 1.0
    for c in range(len(m)):
        p = max(range(c, len(m)), key=lambda r: abs(m[r][c]))
        if m[p][c] == 0:
            return 0.0
        if p != c:
            m[c], m[p], det = m[p], m[c], -det
        det *= m[c][c]
        for r in range(c + 1, len(m)):
            f = m[r][c] / m[c][c]
            m[r] = [a - f * b for a, b in zip(m[r], m[c], strict=True)]
    return det


def greedy_logdet_reference(kernel: list[list[float]], keep: int) -> list[int]:
    picks: list[int] = []
    for _ in range(keep):
        rest = [j for j in range(len(kernel)) if j not in picks]
        picks.append(max(rest, key=lambda j: _det([[kernel[a][b] for b in [*picks, j]] for a in [*picks, j]])))
    return picks


def kernel_reference(tokens: list[list[float]], r: list[float]) -> list[list[float]]:
    n = len(tokens)
    return [[r[i] * _cos(tokens[i], tokens[j]) * r[j] for j in range(n)] for i in range(n)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keep", [1, 3, 7, 12])
def test_divprune_matches_the_loops(seed: int, keep: int) -> None:
    tokens = torch.randn(3, 12, 5, generator=torch.Generator().manual_seed(seed))
    got = divprune_select(tokens, keep)
    assert got.shape == (3, keep) and got.dtype == torch.long
    for row in range(3):
        assert got[row].tolist() == divprune_reference(_lists(tokens[row]), keep)


def test_divprune_known_answer() -> None:
    """Five directions in the plane: two near-duplicate pairs and one alone; keeping 3 takes one of each group."""
    angles = [0.0, 0.05, 1.6, 1.65, 3.3]
    tokens = torch.tensor([[math.cos(a), math.sin(a)] for a in angles]).unsqueeze(0)
    # the lone token 4 is farthest from its nearest other; then 1 (farthest from 4); then 3 (farther from {1, 4} than 2)
    assert divprune_select(tokens, 3).tolist() == [[1, 3, 4]]


def test_divprune_is_fp32_whatever_the_input_dtype() -> None:
    tokens = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(divprune_select(tokens.double(), 6), divprune_select(tokens, 6))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("keep", "ratio"), [(6, 0.5), (6, 0.0), (9, 0.25), (20, 0.5), (5, 1.0), (24, 0.25)])
def test_vispruner_matches_the_loops(seed: int, keep: int, ratio: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    features, attention = torch.randn(3, 24, 6, generator=gen), torch.rand(3, 24, generator=gen)
    important = VisPrunerConfig(tokens=keep, important_ratio=ratio).important
    got = vispruner_select(features, attention, keep, important)
    assert got.shape == (3, keep)
    for row in range(3):
        assert got[row].tolist() == vispruner_reference(_lists(features[row]), _lists(attention[row]), keep, important)


def test_vispruner_rounds_cap_at_eight_and_may_drop_all_of_a() -> None:
    """40 residual tokens to 1 diverse: rounds of 8 while a is large, then r' >= |a| empties a (R -> R // 2)."""
    gen = torch.Generator().manual_seed(11)
    features, attention = torch.randn(1, 41, 4, generator=gen), torch.rand(1, 41, generator=gen)
    got = vispruner_select(features, attention, 2, 1)
    assert got[0].tolist() == vispruner_reference(_lists(features[0]), _lists(attention[0]), 2, 1)


def test_vispruner_ratio_one_is_cls_attention_top_k() -> None:
    gen = torch.Generator().manual_seed(2)
    features, attention = torch.randn(2, 16, 4, generator=gen), torch.rand(2, 16, generator=gen)
    expected = attention.topk(5, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(vispruner_select(features, attention, 5, 5), expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keep", [1, 2, 4, 7])
def test_cdpruner_greedy_is_greedy_log_det(seed: int, keep: int) -> None:
    """The fast greedy MAP picks, in order, what greedy maximisation of det L[S] by brute force picks (N = 7, C = 9:
    L has full rank). Only the greedy is tested, not that it finds the best subset (it need not)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, relevance = torch.randn(2, 7, 9, generator=gen), torch.rand(2, 7, generator=gen) + 0.1
    kernel = cdpruner_kernel(tokens, relevance)
    picked = dpp_greedy_map(kernel, keep)
    for row in range(2):
        reference = kernel_reference(_lists(tokens[row]), _lists(relevance[row]))
        assert torch.allclose(kernel[row].double(), torch.tensor(reference, dtype=torch.float64), atol=1e-5)
        assert picked[row].tolist() == greedy_logdet_reference(reference, keep)
    assert torch.equal(cdpruner_select(tokens, relevance, keep), picked.sort(dim=-1).values)


def test_cdpruner_relevance_matches_its_definition_per_row() -> None:
    gen = torch.Generator().manual_seed(3)
    image, text = torch.randn(3, 10, 6, generator=gen), torch.randn(3, 2, 6, generator=gen)
    got = cdpruner_relevance(image, text)
    for row in range(3):
        expected = relevance_reference(_lists(image[row]), _lists(text[row]))
        assert torch.allclose(got[row].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    # a padded segment is ignored: row 0 with its second segment masked = row 0 with one segment
    masked = cdpruner_relevance(image, text, torch.tensor([[True, False], [True, True], [True, True]]))
    assert torch.allclose(masked[0], cdpruner_relevance(image[:1], text[:1, :1])[0])
    assert torch.allclose(masked[1:], got[1:])
    with pytest.raises(ValueError, match="at least one text segment"):
        cdpruner_relevance(image, text, torch.tensor([[False, False], [True, True], [True, True]]))


def test_cdpruner_relevance_constant_is_one() -> None:
    image = torch.ones(1, 4, 3)
    assert torch.equal(cdpruner_relevance(image, torch.randn(1, 1, 3)), torch.ones(1, 4))


def test_cdpruner_kernel_is_psd() -> None:
    gen = torch.Generator().manual_seed(4)
    tokens, relevance = torch.randn(3, 20, 8, generator=gen), torch.rand(3, 20, generator=gen)
    kernel = cdpruner_kernel(tokens, relevance).double()
    assert torch.allclose(kernel, kernel.transpose(-1, -2))
    assert torch.linalg.eigvalsh(kernel).min() > -1e-5


def test_cdpruner_constant_relevance_is_pure_diversity() -> None:
    """r = c for all tokens scales L by c^2, which does not change any greedy choice: the DPP on S alone."""
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randn(1, 7, 9, generator=gen)
    picks = cdpruner_select(tokens, torch.full((1, 7), 0.3), 4)
    similarity = kernel_reference(_lists(tokens[0]), [1.0] * 7)
    assert picks[0].tolist() == sorted(greedy_logdet_reference(similarity, 4))


def test_cdpruner_rank_deficient_kernel_stays_finite() -> None:
    """More picks than L's rank (C = 2): the later picks add no update, and every index is still picked once."""
    gen = torch.Generator().manual_seed(8)
    tokens, relevance = torch.randn(2, 6, 2, generator=gen), torch.rand(2, 6, generator=gen)
    got = cdpruner_select(tokens, relevance, 6)
    assert got.tolist() == [list(range(6))] * 2
    four = cdpruner_select(tokens, relevance, 4)
    assert all(len(set(row)) == 4 for row in four.tolist())
    assert torch.isfinite(cdpruner_kernel(tokens, relevance)).all()


def _run(method: str, tokens: torch.Tensor, keep: int, gen: torch.Generator) -> torch.Tensor:
    b, n = tokens.shape[:2]
    side = torch.rand(b, n, generator=gen)
    if method == "divprune":
        return divprune_select(tokens, keep)
    if method == "vispruner":
        return vispruner_select(tokens, side, keep, keep // 2)
    return cdpruner_select(tokens, side + 0.1, keep)


@pytest.mark.parametrize("method", ["divprune", "vispruner", "cdpruner"])
def test_keep_all_is_the_identity(method: str) -> None:
    tokens = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(1))
    got = _run(method, tokens, 9, torch.Generator().manual_seed(0))
    assert torch.equal(got, torch.arange(9).expand(2, 9))


@pytest.mark.parametrize("method", ["divprune", "vispruner", "cdpruner"])
def test_duplicate_tokens_are_each_picked_once(method: str) -> None:
    """Copies of a token are at distance 0 (similarity 1) from it: keeping all still picks every position once."""
    tokens = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(7))
    tokens[0, 3] = tokens[0, 1]
    tokens[0, 5] = tokens[0, 1]
    got = _run(method, tokens, 6, torch.Generator().manual_seed(0))
    assert got.tolist() == [list(range(6))]


@pytest.mark.parametrize("method", ["divprune", "vispruner", "cdpruner"])
def test_batch_is_one_row_at_a_time(method: str) -> None:
    tokens = torch.randn(4, 16, 6, generator=torch.Generator().manual_seed(9))
    batched = _run(method, tokens, 5, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    side = torch.rand(4, 16, generator=gen)  # what _run drew for the whole batch, replayed row by row
    for row in range(4):
        if method == "divprune":
            one = divprune_select(tokens[row : row + 1], 5)
        elif method == "vispruner":
            one = vispruner_select(tokens[row : row + 1], side[row : row + 1], 5, 2)
        else:
            one = cdpruner_select(tokens[row : row + 1], side[row : row + 1] + 0.1, 5)
        assert torch.equal(batched[row : row + 1], one)


def test_cdpruner_rows_do_not_share_the_relevance_scale() -> None:
    """Scaling row 1's raw relevance scores leaves row 0's normalised relevance (and picks) unchanged."""
    gen = torch.Generator().manual_seed(12)
    image, text = torch.randn(2, 8, 4, generator=gen), torch.randn(2, 1, 4, generator=gen)
    first = cdpruner_relevance(image, text)
    text_other = torch.stack([text[0], -text[1]])
    assert torch.equal(cdpruner_relevance(image, text_other)[0], first[0])


@pytest.mark.parametrize(
    ("config", "options", "message"),
    [
        (DivPruneConfig, {"tokens": 0}, "tokens must be an integer >= 1, got 0"),
        (CDPrunerConfig, {"tokens": -3}, "tokens must be an integer >= 1, got -3"),
        (VisPrunerConfig, {"tokens": 2.5}, "tokens must be an integer >= 1, got 2.5"),
        (VisPrunerConfig, {"important_ratio": 1.5}, r"important_ratio must be in \[0, 1\], got 1.5"),
        (VisPrunerConfig, {"important_ratio": -0.1}, r"important_ratio must be in \[0, 1\], got -0.1"),
    ],
)
def test_bad_configs_are_refused_with_the_numbers(config: type, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**options)


@pytest.mark.parametrize("method", ["divprune", "vispruner", "cdpruner"])
@pytest.mark.parametrize("keep", [0, 10])
def test_keeping_more_than_the_image_has_is_refused(method: str, keep: int) -> None:
    tokens = torch.randn(1, 9, 4)
    with pytest.raises(ValueError, match=f"keeps {keep} tokens, but an image here has 9"):
        _run(method, tokens, keep, torch.Generator().manual_seed(0))


def test_vispruner_important_above_kept_is_refused() -> None:
    with pytest.raises(ValueError, match=r"important tokens must be in \[0, 4\] \(of 4 kept\), got 5"):
        vispruner_select(torch.randn(1, 9, 4), torch.rand(1, 9), 4, 5)


def test_configs_describe_and_round_trip() -> None:
    cases = [
        (DivPruneConfig(tokens=32), "DivPrune, 32 tokens (max-min diversity)"),
        (VisPrunerConfig(tokens=64, important_ratio=0.75), "VisPruner, 64 tokens (48 by [CLS] attention, 16 diverse)"),
        (CDPrunerConfig(tokens=128), "CDPruner, 128 tokens (conditional DPP)"),
    ]
    for cfg, text in cases:
        assert cfg.describe() == text
        data = cfg.to_dict()
        assert data["method"] == cfg.name
        assert type(cfg)(**{k: v for k, v in data.items() if k != "method"}) == cfg
    assert {c.name for c, _ in cases} == {"divprune", "vispruner", "cdpruner"}
    assert VisPrunerConfig(tokens=7, important_ratio=0.5).important == 3  # int(T * r), as the reference
