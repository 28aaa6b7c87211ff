"""llava.bench's rows for the methods that prune inside the language model: FLOPs layer by layer (by hand and by
FlopCounterMode on the model's own forward), the budgets' two readings, KV cache per layer, the CLI end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers.bench import BATCH, CPU, DECODE, TEXT, TINY_15, TINY_LM, TINY_NEXT
from torch.utils.flop_counter import FlopCounterMode

import llava.bench.shapes as shapes
from llava.bench.cli import main
from llava.bench.flops import PrunedRun, lm_flops, path_flops, pruned_lm_flops, pruned_path_flops
from llava.bench.measure import StageClock, make_request, run_request
from llava.bench.methods import calibrated, method_case, pruned_run, rater_counts
from llava.bench.report import paper_speedup
from llava.bench.shapes import PRESETS, LanguageShape, build_model, scale_shape
from visionzip.baselines import layer_average

LM4 = dataclasses.replace(TINY_LM, layers=4)  # room for a cut and layers after it
SHAPES = {
    "llava-1.5": dataclasses.replace(TINY_15, language=LM4),
    "llava-next": dataclasses.replace(TINY_NEXT, language=LM4),
}
# Schedules that fit 4 layers: FastV cuts after layer 0, PDrop after 0 and 1, SparseVLM after 0 and 1.
OPTIONS = {"fastv": {"layer": 1}, "pdrop": {"layers": (1, 2)}, "sparsevlm": {"layers": (0, 1)}}


def test_pruned_flops_by_hand() -> None:
    lm = LanguageShape(hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16, vocab=10, max_positions=64)
    # 3 text tokens; layer 0 takes 4 visual tokens (7 in all), layer 1 takes 1 (4 in all); scored after layer 0.
    run = PrunedRun(counts=(4, 1), scored=(0,), queries=1)
    # per token: q,o 2*8*8 each + k,v 2*8*4 each = 384, SwiGLU 3*2*8*16 = 768; dense pairs: 49 and 16
    layer0, layer1 = 7 * (384 + 768) + 4 * 49 * 8, 4 * (384 + 768) + 4 * 16 * 8
    scores = 2 * (1 * 8 * 8 + 7 * 8 * 4 + 2 * 1 * 7 * 4)  # q_proj on 1 row, k_proj on 7, Q K^T in 2 heads
    logits = 2 * 8 * 10
    # decoding one token: each layer attends to its own cache, 7 + 1 and 4 + 1 keys
    decode0, decode1 = 384 + 768 + 4 * 8 * 8, 384 + 768 + 4 * 5 * 8
    assert pruned_lm_flops(lm, run, 2, 3, 1) == (
        2 * (layer0 + layer1 + scores + logits),
        2 * (decode0 + decode1 + logits),
    )
    raters = PrunedRun(counts=(4, 1), scored=(0,), queries=2, rater_text=3)
    scores2 = 2 * (2 * 8 * 8 + 7 * 8 * 4 + 2 * 2 * 7 * 4)
    assert pruned_lm_flops(lm, raters, 1, 3, 0)[0] == layer0 + layer1 + scores2 + logits + 2 * 4 * 3 * 8
    # nothing cut, nothing scored: the closed form of a vanilla forward, prefill and decode
    same = PrunedRun(counts=(4, 4), scored=(), queries=1)
    assert pruned_lm_flops(lm, same, 2, 3, 2, causal=True) == (
        lm_flops(lm, 2, 7, 0, True),
        lm_flops(lm, 2, 1, 7, True) + lm_flops(lm, 2, 1, 8, True),
    )
    with pytest.raises(ValueError, match="per-layer counts"):
        pruned_lm_flops(lm, PrunedRun((4,), (), 1), 1, 3, 0)


@pytest.mark.parametrize("name", ["fastv", "pdrop", "sparsevlm"])
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_pruned_flops_equal_flop_counter_mode(shape_id: str, name: str) -> None:
    """Torch's FlopCounterMode on the model's own pruned forward (eager: every matmul, dense pairs) counts what the
    layer-by-layer formula counts from the measured per-layer tokens; and the KV cache holds each layer's length."""
    shape = SHAPES[shape_id]
    bench = build_model(shape, CPU, torch.float32, "eager")
    request = make_request(shape, BATCH, TEXT, DECODE, CPU, torch.float32)
    case = calibrated(bench, request, method_case(shape, name, 6, "kept", OPTIONS[name]))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run = run_request(bench, case, request, StageClock(CPU))
    full = run.visual_counts[0]
    assert full == shapes.visual_tokens(shape, None) and run.visual_counts[-1] < full  # something was cut
    flops = pruned_path_flops(shape, pruned_run(shape, case, run.visual_counts, rater_counts(bench, request)), BATCH,
                              TEXT, DECODE)  # fmt: skip
    assert counter.get_total_flops() == flops.first_token + flops.decode, case
    vanilla = path_flops(shape, "vanilla", None, BATCH, TEXT, DECODE)
    assert (flops.encoder, flops.projector) == (vanilla.encoder, vanilla.projector)
    kv_per_token = 2 * BATCH * LM4.kv_heads * LM4.head_dim * 4  # keys + values, fp32, one layer
    assert run.kv_bytes == kv_per_token * sum(TEXT + count for count in run.visual_counts)


def test_budget_readings_on_the_paper_shapes() -> None:
    v15, next7b = PRESETS["llava-1.5-7b"], PRESETS["llava-next-7b"]
    keeps = {b: method_case(v15, "fastv", b, "auto", {}).case.pruning.keep for b in (192, 128, 64)}
    assert keeps == {192: 166, 128: 98, 64: 30}  # the spec's K=2 counts for LLaVA-1.5
    pdrop = method_case(v15, "pdrop", 64, "auto", {}).case
    assert (pdrop.reading, pdrop.pruning.layers, pdrop.pruning.ratio) == ("average", (2, 8, 16), 0.19)
    # NeXT at 160: two full layers on its 2,928 tokens already average 183 over 32: refused, with the numbers
    with pytest.raises(ValueError, match=r"cannot average 160 visual tokens over 32 layers on 2928 tokens"):
        method_case(next7b, "fastv", 160, "average", {})
    fastv = method_case(next7b, "fastv", 160, "auto", {})
    assert (fastv.case.reading, fastv.case.pruning.keep, fastv.case.pruning.layer) == ("kept", 160, 2)
    assert "cannot average 160" in fastv.refused
    counts = [2928] * 2 + [160] * 30
    assert layer_average(counts) == ((2 * 2928 + 30 * 160) / 32, (2928 + 31 * 160) / 32)
    pdrop = method_case(next7b, "pdrop", 160, "kept", {}).case.pruning
    assert [int(2928 * pdrop.ratio**s) for s in (1, 2)] == [160, 8]  # first stage keeps the budget, lambda = 160/2928
    sparse = method_case(next7b, "sparsevlm", 160, "auto", {})
    assert sparse.calibrate and sparse.case.reading == "kept"
    assert method_case(v15, "sparsevlm", 64, "average", {}).calibrate is False
    assert method_case(v15, "sparsevlm", 64, "average", {}, calibrate=True).calibrate
    with pytest.raises(ValueError, match="not a method inside"):
        method_case(v15, "visionzip", 64, "auto", {})


def test_scale_can_keep_every_layer() -> None:
    full_depth = scale_shape(PRESETS["llava-next-7b"], 0.125, depth=False)
    assert (full_depth.language.layers, full_depth.vision.layers) == (32, 24)
    assert (full_depth.language.hidden, full_depth.language.head_dim, full_depth.full_budget) == (512, 128, 2880)
    assert scale_shape(PRESETS["llava-next-7b"], 0.125).language.layers == 4


def test_paper_table4_cells() -> None:
    row = {"model": "llava-next-7b@0.125 (all layers)", "path": "fastv", "budget": 160}
    assert paper_speedup(row) == 1.8
    assert paper_speedup({**row, "path": "ours"}) == 7.8 and paper_speedup({**row, "path": "pdrop"}) is None
    assert paper_speedup({**row, "path": "vanilla", "budget": 2880}) == 1.0
    assert paper_speedup({**row, "budget": 320}) is None and paper_speedup({**row, "model": "llava-1.5-7b"}) is None


def test_cli_rows_for_in_llm_methods(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(shapes.PRESETS, "llava-1.5-7b", SHAPES["llava-1.5"])
    monkeypatch.setitem(shapes.PRESETS, "llava-next-7b", SHAPES["llava-next"])
    options = ["--option", "fastv.layer=1", "--option", "pdrop.layers=1/2", "--option", "sparsevlm.layers=0,1"]
    argv = ["--model", "llava-1.5-7b", "llava-next-7b", "--budgets", "8", "llava-next-7b=20", "--methods", "visionzip",
            "fastv", "pdrop", "sparsevlm", "--paths", "ours", "--repeat", "1", "--warmup", "0", "--text-tokens",
            str(TEXT), "--decode-tokens", str(DECODE), "--out", str(tmp_path), *options]  # fmt: skip
    result = main(argv)
    rows = result["rows"]
    expected = ["vanilla", "ours", "fastv", "pdrop", "sparsevlm"]
    assert [(r["model"], r["path"], r["budget"]) for r in rows] == [
        *(("llava-1.5-7b", path, 16 if path == "vanilla" else 8) for path in expected),
        *(("llava-next-7b", path, 80 if path == "vanilla" else 20) for path in expected),
    ]
    markdown = (tmp_path / "table.md").read_text()
    assert markdown.strip() in capsys.readouterr().out
    for row in rows:
        assert row["first_token_ms"] > 0 and row["decode_ms_per_token"] > 0 and row["peak_extra_mib"] > 0
        counts = row["visual_counts"] or [row["visual_tokens"]] * LM4.layers
        assert row["layer_average"] == list(layer_average(counts))
        inputs, outputs = row["layer_average"]
        assert f"| {row['budget']} | " in markdown and f"{inputs:.1f} / {outputs:.1f}" in markdown
        if row["pruning"] is not None:
            assert row["pruning"]["method"] == row["path"] and row["reading"] in ("average", "kept")
            assert row["flops_ratio"] > 1 and row["kv_cache_mib"] < rows[0]["kv_cache_mib"] * 2
    fastv = next(r for r in rows if r["path"] == "fastv" and r["model"] == "llava-1.5-7b")
    assert fastv["reading"] == "average" and fastv["layer_average"][0] == pytest.approx(8, abs=0.5)
    assert "| FastV | " in markdown and "(kept after cut)" in markdown  # PDrop has no preset at 8: kept
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["depth"] == "full" and saved["settings"]["options"]["pdrop"] == {"layers": [1, 2]}
    with pytest.raises(SystemExit):
        main([*argv, "--option", "fastv.nope=1"])
    with pytest.raises(SystemExit):
        main([*argv, "--budgets", "llava-13b=4"])
    capsys.readouterr()
