"""The encoder benchmark runs end to end at a tiny shape; its paths agree; its memory meter measures."""

from __future__ import annotations

import json

import torch

import visionzip.bench as bench
from visionzip import VisionZipConfig
from visionzip.bench import PATHS, EncoderShape, LiveBytes, build_encoders, main, make_paths, render_table

TINY = EncoderShape(hidden=32, layers=3, heads=4, intermediate=64, image_size=16, patch_size=4)


def test_live_bytes_counts_op_outputs_and_frees() -> None:
    with LiveBytes() as meter:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 4000 more
        view = b[:10]  # no new storage
        del b
        assert meter.live == 8000
        del view
        assert meter.live == 4000
        del a
    assert meter.peak == 8000 and meter.live == 0


def test_released_path_and_ours_give_the_same_tokens() -> None:
    cfg = VisionZipConfig(5, 3)
    models = build_encoders(TINY, torch.device("cpu"), torch.float32)
    assert {m.config._attn_implementation for m in models.values()} == {"sdpa", "eager"}
    paths = make_paths(models, cfg)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(paths["c"](pixels), paths["d"](pixels), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(paths["a"](pixels), paths["b"](pixels), rtol=1e-5, atol=1e-5)


def test_cli_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(bench.SHAPES, "small", TINY)
    out = tmp_path / "enc.json"
    result = main(["encoder", "--small", "--batch", "1", "2", "--repeat", "2", "--dominant", "5", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert len(result["rows"]) == 2 * (len(PATHS) + 1)
    for row in result["rows"]:
        assert row["median_ms"] > 0 and row["ratio_to_a"] > 0
        assert row["path"] == "compress" or row["extra_mib"] > 0
    table = render_table(result)
    assert table.count("\n") == 1 + len(result["rows"]) and "(d) ours" in table
    assert "(c) eager + all attention maps" in capsys.readouterr().out
