"""VisionZipConfig: validation, serialisation and the paper's budget splits."""

from __future__ import annotations

import json

import pytest

from visionzip import VisionZipConfig


def test_round_trip_through_json() -> None:
    cfg = VisionZipConfig(dominant=108, contextual=20, layer=-3, cls_token=False, merge="mean", query_chunk=64, seed=3)
    assert VisionZipConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.tokens == 128


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dominant": 0}, "dominant must be >= 1, got 0"),
        ({"contextual": -1}, "contextual must be >= 0, got -1"),
        ({"merge": "max"}, "merge must be one of"),
        ({"dominant": 5.0}, "dominant must be an int"),
        ({"query_chunk": 0}, "query_chunk must be >= 1"),
        ({"cls_token": 1}, "cls_token must be a bool"),
        ({"seed": 2**32}, "seed must be in \\[0, 4294967296\\), got 4294967296"),
        ({"seed": 1.0}, "seed must be an int"),
    ],
)
def test_invalid_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VisionZipConfig(**kwargs)


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown VisionZipConfig keys"):
        VisionZipConfig.from_dict({"dominant": 5, "contxtual": 2})


def test_layer_resolution() -> None:
    assert VisionZipConfig(layer=-2).resolve_layer(24) == 22
    assert VisionZipConfig(layer=0).resolve_layer(24) == 0
    for bad in (-25, 24):
        with pytest.raises(ValueError, match=f"layer={bad} is out of range for an encoder of 24 layers"):
            VisionZipConfig(layer=bad).resolve_layer(24)


def test_paper_budget_splits() -> None:
    assert [(c.dominant, c.contextual) for c in map(VisionZipConfig.from_budget, (192, 128, 64))] == [
        (162, 30),
        (108, 20),
        (54, 10),
    ]
    assert VisionZipConfig.from_budget(1) == VisionZipConfig(1, 0)
    assert VisionZipConfig.from_budget(7).tokens == 7
