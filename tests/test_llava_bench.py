"""The LLaVA efficiency benchmark: FLOPs by hand and by FlopCounterMode, token counts, paths, the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.bench import BATCH, CPU, DECODE, TEXT, TINY_15, TINY_LM, TINY_NEXT
from torch.utils.flop_counter import FlopCounterMode

import llava.bench.shapes as shapes
from llava.bench.cli import main
from llava.bench.flops import encoder_flops, lm_flops, merge_flops, path_flops, projector_flops, scores_flops
from llava.bench.measure import StageClock, make_cases, make_request, run_request
from llava.bench.shapes import (
    PRESETS,
    LanguageShape,
    LlavaShape,
    build_model,
    scale_shape,
    use_tower,
    view_config,
    visual_tokens,
)
from visionzip import VisionZipConfig
from visionzip.bench import EncoderShape


def test_flops_formulas_match_a_hand_count() -> None:
    vision = EncoderShape(hidden=8, layers=2, heads=2, intermediate=16, image_size=4, patch_size=2)  # P=4, N=5
    # conv 2*4*(3*2*2)*8 = 768; per layer: linear 2*5*(4*8*8 + 2*8*16) = 5120, attention 4*5*5*8 = 800
    assert encoder_flops(vision, images=1, layers_run=2) == 768 + 2 * (5120 + 800)
    assert encoder_flops(vision, images=3, layers_run=1) == 3 * (768 + 5120 + 800)
    assert scores_flops(vision, images=1) == 2 * 5 * 8
    # 5 tokens - 2 dominant = 3 remaining; 2 non-targets x 1 target x head width 4 x 2
    assert merge_flops(vision, 1, VisionZipConfig(2, 1)) == 16
    assert merge_flops(vision, 1, VisionZipConfig(2, 0)) == 0
    assert projector_flops(tokens=4, mm_hidden=8, hidden=8, depth=2) == 2 * 4 * (8 * 8 + 8 * 8)
    lm = LanguageShape(hidden=8, layers=1, heads=2, kv_heads=1, intermediate=16, vocab=10, max_positions=64)
    # prefill of 3: q,o 2*3*8*8 each + k,v 2*3*8*4 each = 1152; Q K^T + A V 4*3*3*8 = 288;
    # SwiGLU 3*2*3*8*16 = 2304; last position's logits 2*8*10 = 160
    assert lm_flops(lm, batch=1, new=3, cached=0) == 1152 + 288 + 2304 + 160
    # causal: the 3 queries attend to 1 + 2 + 3 = 6 keys, not 9: Q K^T + A V 4*6*8 = 192
    assert lm_flops(lm, batch=1, new=3, cached=0, causal=True) == 1152 + 192 + 2304 + 160
    # one step after 3 cached: 384 + 4*1*4*8 + 768 + 160, the same counted either way
    assert lm_flops(lm, batch=2, new=1, cached=3) == lm_flops(lm, 2, 1, 3, causal=True) == 2 * (384 + 128 + 768 + 160)


@pytest.mark.parametrize("shape", [TINY_15, TINY_NEXT], ids=["llava-1.5", "llava-next"])
def test_flops_equal_flop_counter_mode_on_the_model(shape: LlavaShape) -> None:
    """An independent count: torch's FlopCounterMode on the model's own forward (eager: it sees every matmul)."""
    bench = build_model(shape, CPU, torch.float32, "eager")
    request = make_request(shape, BATCH, TEXT, DECODE, CPU, torch.float32)
    for case in make_cases(shape, list(shape.budgets)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run_request(bench, case, request, StageClock(CPU))
        flops = path_flops(shape, case.path, case.visionzip, BATCH, TEXT, DECODE, causal=False)  # eager: dense
        assert counter.get_total_flops() == flops.first_token + flops.decode, case.label


def test_token_counts_per_path_and_budget() -> None:
    next7b, v15 = PRESETS["llava-next-7b"], PRESETS["llava-1.5-7b"]
    assert (v15.full_budget, visual_tokens(v15, None)) == (576, 576)
    assert (next7b.views, next7b.full_budget) == (5, 2880)
    assert visual_tokens(next7b, None) == 576 + 48 * 48 + 48  # base + 2x2 crops stitched + a newline per row
    splits = {b: (view_config(v15, b).dominant, view_config(v15, b).contextual) for b in v15.budgets}
    assert splits == {192: (162, 30), 128: (108, 20), 64: (54, 10)}
    splits = {b: (view_config(next7b, b).dominant, view_config(next7b, b).contextual) for b in next7b.budgets}
    assert splits == {640: (108, 20), 320: (54, 10), 160: (27, 5)}
    assert [visual_tokens(next7b, view_config(next7b, b)) for b in next7b.budgets] == [640, 320, 160]
    with pytest.raises(ValueError, match="multiple of"):
        view_config(next7b, 64)
    expected = {TINY_15: [16, 8, 8, 4, 4], TINY_NEXT: [16 + 8 * 8 + 8, 40, 40, 20, 20]}
    for shape, counts in expected.items():
        bench = build_model(shape, CPU, torch.float32, "sdpa")
        request = make_request(shape, BATCH, TEXT, 0, CPU, torch.float32)
        with torch.no_grad():
            runs = [run_request(bench, case, request, StageClock(CPU)) for case in make_cases(shape, [*shape.budgets])]
        assert [run.seq_len - TEXT for run in runs] == counts
        kv_per_token = 2 * TINY_LM.layers * BATCH * TINY_LM.kv_heads * TINY_LM.head_dim * 4  # keys + values, fp32
        assert [run.kv_bytes for run in runs] == [kv_per_token * run.seq_len for run in runs]
        assert set(runs[0].ms) == {"encoder", "projector", "input", "prefill", "decode"}


def test_released_tower_gives_our_tokens() -> None:
    """The released path (eager, all maps) and ours select and merge the same tokens in the model."""
    bench = build_model(TINY_NEXT, CPU, torch.float32, "sdpa")
    request = make_request(TINY_NEXT, BATCH, TEXT, 0, CPU, torch.float32)
    bench.model.set_visionzip(view_config(TINY_NEXT, 20))
    with torch.no_grad():
        ours = bench.model.image_features(request.images, request.image_sizes)
        with use_tower(bench, bench.released_tower):
            assert bench.model.get_vision_tower() is bench.released_tower
            released = bench.model.image_features(request.images, request.image_sizes)
    assert bench.model.get_vision_tower() is bench.tower
    for a, b in zip(ours, released, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_scale_keeps_token_counts_and_head_widths() -> None:
    half = scale_shape(PRESETS["llava-1.5-7b"], 0.5)
    assert (half.language.hidden, half.language.heads, half.language.layers) == (2048, 16, 16)
    assert (half.language.intermediate, half.language.head_dim, half.language.vocab) == (5504, 128, 32000)
    assert (half.vision.hidden, half.vision.heads, half.vision.layers, half.vision.intermediate) == (512, 8, 12, 2048)
    assert (half.patches, half.full_budget, half.views) == (576, 576, 1)
    assert scale_shape(PRESETS["llava-next-13b"], 0.05).vision.layers == 2  # the select layer -2 still exists
    with pytest.raises(ValueError, match="scale"):
        scale_shape(PRESETS["llava-1.5-7b"], 1.5)


def test_cli_runs_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(shapes.PRESETS, "llava-1.5-7b", TINY_15)
    monkeypatch.setitem(shapes.PRESETS, "llava-next-7b", TINY_NEXT)
    argv = ["--model", "llava-1.5-7b", "llava-next-7b", "--repeat", "1", "--warmup", "0", "--text-tokens", str(TEXT),
            "--decode-tokens", str(DECODE), "--batch", str(BATCH), "--out", str(tmp_path)]  # fmt: skip
    result = main(argv)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "time_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "table.md").read_text()
    assert markdown.strip() in capsys.readouterr().out
    rows = result["rows"]
    assert len(rows) == 2 * (1 + 3 * 2) and markdown.count("| llava-") == len(rows)  # released, ours, hf
    for row in rows:
        assert row["first_token_ms"] > 0 and row["decode_ms_per_token"] > 0 and row["peak_extra_mib"] > 0
        assert row["flops_ratio"] >= 1 and row["seq_len"] == TEXT + row["visual_tokens"]
        if row["path"] == "vanilla":
            assert row["first_token_speedup"] == row["flops_ratio"] == 1
    assert len(result["goals"]) == 2 * 2 * 2  # per model and budget: FLOPs-ratio goal, ours vs released
    assert all(isinstance(goal["passed"], bool) for goal in result["goals"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_on_cuda_uses_events_and_the_allocator_peak(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(shapes.PRESETS, "llava-next-7b", TINY_NEXT)
    argv = [
        "--model",
        "llava-next-7b",
        "--device",
        "cuda",
        "--repeat",
        "2",
        "--decode-tokens",
        "2",
        "--out",
        str(tmp_path),
    ]
    result = main(argv)
    assert result["settings"]["dtype"] == "float16" and result["settings"]["gpu"]
    assert all(row["cuda_peak_extra_mib"] > 0 and row["first_token_ms"] > 0 for row in result["rows"])
