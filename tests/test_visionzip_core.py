"""VisionZip on tensors: hand-computed cases, identities, and a loop-based reference of the released algorithm."""

from __future__ import annotations

import pytest
import torch
from helpers.visionzip_reference import reference_compress, reference_content_seed

from visionzip import VisionZipConfig, compress, merge_contextual, select_dominant
from visionzip.core import content_seeds, remaining_indices, target_positions


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_hand_computed_case() -> None:
    # 1 [CLS] + 5 patches; keep [CLS] + 2 by score, merge the other 3 into 1 (target = first remaining).
    hidden = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0]]])
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.2, 0.9, 0.3]])  # patches 2 and 4 win; [CLS]'s own score is ignored
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.0]]])
    tokens, keep = compress(hidden, scores, keys, VisionZipConfig(dominant=3, contextual=1))
    assert keep.tolist() == [[0, 2, 4]]
    # remaining 1, 3, 5; target 1; members 3, 5 -> 1 + mean(3, 5) = 5
    assert tokens.tolist() == [[[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [5.0, 0.0]]]


def test_hand_computed_two_targets_and_mean_merge() -> None:
    # No [CLS]; keep 1; 5 remaining -> targets at stride 5 // 2 = 2: remaining positions 0 and 2.
    hidden = torch.arange(6, dtype=torch.float32).view(1, 6, 1) * 10  # token i has value 10 i
    scores = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])
    cfg = VisionZipConfig(dominant=1, contextual=2, cls_token=False)
    tokens, keep = compress(hidden, scores, keys, cfg)
    assert keep.tolist() == [[3]]
    # remaining [0, 1, 2, 4, 5]; targets tokens 0 and 2; 1 -> ? (cos with 0 is 0, with 2 is 0: tie, first: 0)
    # 4 -> 0 (first on tie: both keys [1, 0]); 5 -> 0 (tie at 0 again). Target 2 keeps nothing.
    assert tokens.flatten().tolist() == pytest.approx([30.0, 0.0 + (10 + 40 + 50) / 3, 20.0])
    tokens_mean, _ = compress(hidden, scores, keys, VisionZipConfig(1, 2, cls_token=False, merge="mean"))
    assert tokens_mean.flatten().tolist() == pytest.approx([30.0, (0 + 10 + 40 + 50) / 4, 20.0])


def test_every_token_dominant_is_identity() -> None:
    gen = _gen(0)
    hidden = torch.randn(2, 10, 4, generator=gen)
    scores, keys = torch.rand(2, 10, generator=gen), torch.randn(2, 10, 3, generator=gen)
    tokens, keep = compress(hidden, scores, keys, VisionZipConfig(10, 0))
    assert torch.equal(tokens, hidden)
    assert keep.tolist() == [list(range(10))] * 2


def test_merge_n_into_n_is_identity() -> None:
    gen = _gen(1)
    hidden, keys = torch.randn(3, 7, 5, generator=gen), torch.randn(3, 7, 4, generator=gen)
    for mode in ("paper", "mean"):
        assert torch.equal(merge_contextual(hidden, keys, 7, mode), hidden)


@pytest.mark.parametrize(
    ("dominant", "contextual", "cls_token"), [(5, 3, True), (1, 4, True), (7, 0, False), (4, 1, False)]
)
@pytest.mark.parametrize("merge", ["paper", "mean"])
def test_matches_loop_reference(dominant: int, contextual: int, cls_token: bool, merge: str) -> None:
    gen = torch.Generator().manual_seed(dominant * 10 + contextual)
    hidden, scores, keys = (
        torch.randn(3, 17, 6, generator=gen),
        torch.rand(3, 17, generator=gen),
        torch.randn(3, 17, 4, generator=gen),
    )
    cfg = VisionZipConfig(dominant, contextual, cls_token=cls_token, merge=merge)
    tokens, keep = compress(hidden, scores, keys, cfg)
    ref_tokens, ref_keep = reference_compress(hidden, scores, keys, cfg)
    assert keep.tolist() == ref_keep
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)


def test_shapes_order_and_ranges() -> None:
    scores = torch.rand(4, 50, generator=_gen(2))
    keep = select_dominant(scores, 12, cls_token=True)
    assert keep.shape == (4, 12) and (keep[:, 0] == 0).all()
    assert (keep.diff(dim=1) > 0).all() and keep.max() < 50
    rest = remaining_indices(keep, 50)
    assert rest.shape == (4, 38) and (rest.diff(dim=1) > 0).all()
    for k, r in zip(keep.tolist(), rest.tolist(), strict=True):
        assert sorted(k + r) == list(range(50))
    assert target_positions(38, 10).tolist() == list(range(0, 30, 3))
    assert target_positions(5, 10).tolist() == [0, 1, 2, 3, 4][:10]


def test_ties_keep_the_lower_position_as_the_loop_reference() -> None:
    # four score levels over 30 tokens: many ties at the cut-off, which topk would break in an unspecified way
    gen = _gen(3)
    hidden, keys = torch.randn(3, 30, 8, generator=gen), torch.randn(3, 30, 4, generator=gen)
    scores = torch.randint(0, 4, (3, 30), generator=gen).float() / 4
    for cls_token in (True, False):
        cfg = VisionZipConfig(8, 4, cls_token=cls_token)
        tokens, keep = compress(hidden, scores, keys, cfg)
        ref_tokens, ref_keep = reference_compress(hidden, scores, keys, cfg)
        assert keep.tolist() == ref_keep
        torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)
    assert select_dominant(torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5]]), 3).tolist() == [[0, 1, 2]]
    assert select_dominant(torch.tensor([[1.0, 0.0, 1.0, 1.0]]), 2, cls_token=False).tolist() == [[0, 2]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_hidden_keeps_indices_and_dtype(dtype: torch.dtype) -> None:
    gen = _gen(4)
    hidden, keys = torch.randn(2, 30, 8, generator=gen), torch.randn(2, 30, 4, generator=gen)
    # distinct multiples of 1/64: exact in fp16 and bf16, so there are no ties and the same tokens must win
    scores = torch.stack([torch.randperm(30, generator=gen) for _ in range(2)]).float() / 64
    cfg = VisionZipConfig(8, 4)
    _, keep32 = compress(hidden, scores, keys, cfg)
    tokens, keep = compress(hidden.to(dtype), scores.to(dtype).float(), keys.to(dtype), cfg)
    assert tokens.dtype == dtype
    assert torch.equal(keep, keep32)
    ref_tokens, ref_keep = reference_compress(hidden.to(dtype).double(), scores.double(), keys.to(dtype).double(), cfg)
    assert keep.tolist() == ref_keep
    # the reference works in float64 from the same rounded inputs: the gap is the output rounding (and fp32 sums)
    torch.testing.assert_close(tokens.double(), ref_tokens, rtol=1e-2, atol=1e-2)


def test_batch_rows_are_independent_of_each_other() -> None:
    gen = _gen(5)
    hidden, scores, keys = (
        torch.randn(4, 40, 8, generator=gen),
        torch.rand(4, 40, generator=gen),
        torch.randn(4, 40, 4, generator=gen),
    )
    cfg = VisionZipConfig(9, 5)
    tokens, keep = compress(hidden, scores, keys, cfg)
    for b in range(4):  # each row alone, and through the loop reference
        alone_tokens, alone_keep = compress(hidden[b : b + 1], scores[b : b + 1], keys[b : b + 1], cfg)
        ref_tokens, ref_keep = reference_compress(hidden[b : b + 1], scores[b : b + 1], keys[b : b + 1], cfg)
        assert keep[b].tolist() == alone_keep[0].tolist() == ref_keep[0]
        torch.testing.assert_close(tokens[b], alone_tokens[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(tokens[b], ref_tokens[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((2, 10), (2, 10), (2, 10, 3)), "hidden_states must be"),
        (((2, 10, 4), (2, 10, 1), (2, 10, 3)), "scores must be"),
        (((2, 10, 4), (2, 9), (2, 10, 3)), "does not match"),
        (((2, 10, 4), (2, 10), (2, 9, 3)), "does not match"),
        (((2, 10, 4), (2, 10), (2, 10)), "keys must be"),
    ],
)
def test_shape_errors(shapes: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compress(*(torch.zeros(s) for s in shapes), VisionZipConfig(2, 1))


def test_budget_errors_name_the_numbers() -> None:
    hidden, scores, keys = torch.zeros(1, 10, 4), torch.zeros(1, 10), torch.zeros(1, 10, 2)
    with pytest.raises(ValueError, match="dominant=11 is larger than the 10 tokens"):
        compress(hidden, scores, keys, VisionZipConfig(11, 0))
    with pytest.raises(ValueError, match="contextual=4 is larger than the 3 tokens left"):
        compress(hidden, scores, keys, VisionZipConfig(7, 4))


def test_random_selection_ignores_scores() -> None:
    gen = _gen(6)
    hidden, keys = torch.randn(3, 17, 8, generator=gen), torch.randn(3, 17, 4, generator=gen)
    scores = torch.rand(3, 17, generator=gen)
    cfg = VisionZipConfig(dominant=5, contextual=2, selection="random")
    tokens, keep = compress(hidden, scores, keys, cfg)
    _, keep_other_scores = compress(hidden, scores.flip(1) * 7, keys, cfg)
    assert torch.equal(keep, keep_other_scores) and tokens.shape == (3, 7, 8)
    assert (keep[:, 0] == 0).all(), "[CLS] is still kept"
    attention_keep = compress(hidden, scores, keys, VisionZipConfig(dominant=5, contextual=2))[1]
    assert not torch.equal(keep, attention_keep)
    assert len({tuple(row) for row in keep.tolist()}) == 3, "each image of a batch draws its own patches"
    with pytest.raises(ValueError, match="selection"):
        VisionZipConfig(selection="best")


def _random_keep_reference(content: torch.Tensor, num_tokens: int, cfg: VisionZipConfig) -> list[int]:
    """Kept positions of one image: its own generator, seeded by the byte-by-byte seed, then a loop top-k."""
    draw = torch.rand(num_tokens, generator=_gen(reference_content_seed(content, cfg.seed))).tolist()
    first = 1 if cfg.cls_token else 0
    top = sorted(range(first, num_tokens), key=lambda i: -draw[i])[: cfg.dominant - first]
    return sorted([0] * first + top)


@pytest.mark.parametrize("cls_token", [True, False])
def test_random_selection_depends_only_on_the_image_and_seed(cls_token: bool) -> None:
    gen = _gen(7)
    hidden, keys = torch.randn(7, 50, 8, generator=gen), torch.randn(7, 50, 4, generator=gen)
    scores = torch.rand(7, 50, generator=gen)
    cfg = VisionZipConfig(dominant=10, contextual=3, cls_token=cls_token, selection="random")
    image = 0

    def keep_of(rows: list[int], seed: int = 0) -> torch.Tensor:
        return compress(hidden[rows], scores[rows], keys[rows], VisionZipConfig(**{**cfg.to_dict(), "seed": seed}))[1]

    alone = keep_of([image])[0]
    assert alone.tolist() == _random_keep_reference(hidden[image], 50, cfg)
    for rows, position in (([image, 1, 2, 3], 0), ([1, 2, 3, image], 3), ([4, 5, 6, image], 3), ([6, image], 1)):
        assert torch.equal(keep_of(rows)[position], alone), (rows, position)
    other_seed = keep_of([image], seed=1)[0]
    assert other_seed.tolist() == _random_keep_reference(
        hidden[image], 50, VisionZipConfig(10, 3, cls_token=cls_token, seed=1)
    )
    assert not torch.equal(other_seed, alone)


def test_content_seeds_match_the_byte_by_byte_restatement() -> None:
    gen = _gen(8)
    for content in (torch.randn(3, 2, 5, generator=gen), torch.randn(2, 33, generator=gen).bfloat16()):
        for seed in (0, 5, 2**32 - 1):
            assert content_seeds(content, seed) == [reference_content_seed(row, seed) for row in content]
    same, changed = torch.zeros(2, 16), torch.zeros(2, 16)
    changed[1, 15] = 1e-30  # a tiny change in one value
    assert content_seeds(same, 0)[0] == content_seeds(same, 0)[1] != content_seeds(changed, 0)[1]
    with pytest.raises(ValueError, match="seed must be in"):
        VisionZipConfig(seed=-1)
