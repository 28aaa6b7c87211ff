"""VisionZip on tensors: hand-computed cases, identities, and a loop-based reference of the released algorithm."""

from __future__ import annotations

import pytest
import torch
from visionzip_reference import reference_compress

from visionzip import VisionZipConfig, compress, merge_contextual, select_dominant
from visionzip.core import remaining_indices, target_positions


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
    hidden = torch.randn(2, 10, 4)
    tokens, keep = compress(hidden, torch.rand(2, 10), torch.randn(2, 10, 3), VisionZipConfig(10, 0))
    assert torch.equal(tokens, hidden)
    assert keep.tolist() == [list(range(10))] * 2


def test_merge_n_into_n_is_identity() -> None:
    hidden, keys = torch.randn(3, 7, 5), torch.randn(3, 7, 4)
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
    scores = torch.rand(4, 50)
    keep = select_dominant(scores, 12, cls_token=True)
    assert keep.shape == (4, 12) and (keep[:, 0] == 0).all()
    assert (keep.diff(dim=1) > 0).all() and keep.max() < 50
    rest = remaining_indices(keep, 50)
    assert rest.shape == (4, 38) and (rest.diff(dim=1) > 0).all()
    for k, r in zip(keep.tolist(), rest.tolist(), strict=True):
        assert sorted(k + r) == list(range(50))
    assert target_positions(38, 10).tolist() == list(range(0, 30, 3))
    assert target_positions(5, 10).tolist() == [0, 1, 2, 3, 4][:10]


def test_low_precision_hidden_keeps_indices_and_dtype() -> None:
    hidden, scores, keys = torch.randn(2, 30, 8), torch.rand(2, 30), torch.randn(2, 30, 4)
    cfg = VisionZipConfig(8, 4)
    tokens32, keep32 = compress(hidden, scores, keys, cfg)
    for dtype in (torch.bfloat16, torch.float16):
        tokens, keep = compress(hidden.to(dtype), scores.to(dtype).float(), keys.to(dtype), cfg)
        assert tokens.dtype == dtype
        # scores rounded to the low precision may tie; where they do not, the choice is the same
        if scores.to(dtype).unique().numel() == scores.numel():
            assert torch.equal(keep, keep32)  # rounding is monotonic: without ties the order is kept
        torch.testing.assert_close(tokens[:, :8].float(), tokens32[:, :8], rtol=1e-2, atol=1e-2)


def test_deterministic() -> None:
    hidden, scores, keys = torch.randn(2, 40, 8), torch.rand(2, 40), torch.randn(2, 40, 4)
    first = compress(hidden, scores, keys, VisionZipConfig(9, 5))
    second = compress(hidden, scores, keys, VisionZipConfig(9, 5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


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


def test_random_selection_ignores_scores_and_repeats() -> None:
    torch.manual_seed(0)
    hidden, keys = torch.randn(3, 17, 8), torch.randn(3, 17, 4)
    scores = torch.rand(3, 17)
    cfg = VisionZipConfig(dominant=5, contextual=2, selection="random")
    tokens, keep = compress(hidden, scores, keys, cfg)
    _, keep_again = compress(hidden, scores.flip(1) * 7, keys, cfg)  # other scores, same draw
    assert torch.equal(keep, keep_again) and tokens.shape == (3, 7, 8)
    assert (keep[:, 0] == 0).all(), "[CLS] is still kept"
    attention_keep = compress(hidden, scores, keys, VisionZipConfig(dominant=5, contextual=2))[1]
    assert not torch.equal(keep, attention_keep)
    assert len({tuple(row) for row in keep.tolist()}) == 3, "each image of a batch draws its own patches"
    with pytest.raises(ValueError, match="selection"):
        VisionZipConfig(selection="best")
