"""llava.bench's rows for the encoder-side selections (DivPrune, VisPruner, CDPruner), every method at one budget,
the 13B+VisionZip against 7B comparison (Table 7), 8/4-bit memory rows and the run presets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers.bench import BATCH, CPU, DECODE, TEXT, TINY_15, TINY_LM, TINY_NEXT
from torch.utils.flop_counter import FlopCounterMode

import llava.bench.shapes as shapes
from llava.bench.cli import RUN_PRESETS, _preset_argv, main
from llava.bench.flops import path_flops, selection_path_flops
from llava.bench.measure import CLOCKS, StageClock, make_request, run_request
from llava.bench.quant import quantize_model
from llava.bench.report import bigger_vs_smaller
from llava.bench.selection import method_overhead, selection_case
from llava.bench.text_tower import CLIP_L_TEXT, text_shape
from visionzip.bench import CLIP_L_336
from visionzip.methods import METHODS, SELECTION_METHODS

LM4 = dataclasses.replace(TINY_LM, layers=4)  # room for the in-LLM methods' cuts
SHAPES = {
    "llava-1.5-7b": dataclasses.replace(TINY_15, language=LM4),
    "llava-next-7b": dataclasses.replace(TINY_NEXT, language=LM4),
    # a wider, deeper LLM under the same encoder, as LLaVA-NeXT-13B is to 7B
    "llava-next-13b": dataclasses.replace(TINY_NEXT, name="llava-next-13b",
                                          language=dataclasses.replace(LM4, hidden=48, heads=6, kv_heads=3, layers=5)),
}  # fmt: skip
# widths bitsandbytes' CPU 4-bit kernel takes (multiples of 64 in, 32 out; llava.bench.quant.CPU_4BIT_MULTIPLES)
QUANT_NEXT = dataclasses.replace(
    TINY_NEXT, vision=dataclasses.replace(TINY_NEXT.vision, hidden=64, intermediate=128),
    language=dataclasses.replace(LM4, hidden=64, intermediate=128),
)  # fmt: skip
LLM_OPTIONS = ["--option", "fastv.layer=1", "--option", "pdrop.layers=1/2", "--option", "sparsevlm.layers=0,1"]
SMALL_RUN = ["--repeat", "1", "--warmup", "0", "--text-tokens", str(TEXT), "--decode-tokens", str(DECODE)]


@pytest.fixture
def tiny_presets(monkeypatch):
    for name, shape in SHAPES.items():
        monkeypatch.setitem(shapes.PRESETS, name, shape)


@pytest.mark.parametrize("name", SELECTION_METHODS)
@pytest.mark.parametrize("shape", [TINY_15, TINY_NEXT], ids=["llava-1.5", "llava-next"])
def test_selection_flops_equal_flop_counter_mode(shape, name: str) -> None:
    """FlopCounterMode on the model's own request (eager: every matmul) counts what the closed form plus the
    method's own step (counted apart by method_overhead, CDPruner's text tower in it) counts."""
    bench = build = shapes.build_model(shape, CPU, torch.float32, "eager", text=name == "cdpruner")
    request = make_request(shape, BATCH, TEXT, DECODE, CPU, torch.float32)
    case = selection_case(shape, name, 2 * shape.views, {})
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run = run_request(bench, case, request, StageClock(CPU))
    assert run.seq_len == TEXT + 2 * shape.views == TEXT + shapes.visual_tokens(shape, case.selection)
    own = method_overhead(build, case, request, 1, CPU)
    assert own["flops"] > 0 and own["share"] == own["method_ms"] / own["encoder_ms"]
    assert (own["text_ms"] > 0) == (name == "cdpruner")
    cfg = case.selection
    flops = selection_path_flops(shape, cfg.tokens, cfg.features == "encoder", own["flops"], BATCH, TEXT, DECODE)
    assert counter.get_total_flops() == flops.first_token + flops.decode, name
    vanilla = path_flops(shape, "vanilla", None, BATCH, TEXT, DECODE)
    assert flops.prefill < vanilla.prefill and flops.encoder > vanilla.encoder


def test_text_tower_shape_follows_the_vision_scale() -> None:
    assert text_shape(CLIP_L_336) == CLIP_L_TEXT
    eighth = shapes.scale_shape(shapes.PRESETS["llava-1.5-7b"], 0.125)  # 2 of 16 vision heads, 3 of 24 layers
    small = text_shape(eighth.vision)
    assert (small.heads, small.hidden, small.layers, small.intermediate) == (2, 128, 2, 512)
    assert (small.positions, small.vocab, small.projection) == (77, 49408, 96)
    with pytest.raises(ValueError, match="multiple of"):
        selection_case(TINY_NEXT, "divprune", 7, {})
    with pytest.raises(ValueError, match="not an encoder-side selection"):
        selection_case(TINY_15, "fastv", 8, {})


def test_every_method_at_one_budget(tiny_presets, tmp_path, capsys) -> None:
    argv = ["--preset", "methods", "--budgets", "llava-1.5-7b=8", "llava-next-7b=20", *SMALL_RUN, *LLM_OPTIONS,
            "--option", "vispruner.important_ratio=0.25", "--out", str(tmp_path)]  # fmt: skip
    result = main(argv)
    rows = result["rows"]
    for model, budget in (("llava-1.5-7b", 8), ("llava-next-7b", 20)):
        own = [r for r in rows if r["model"] == model]
        assert [r["path"] for r in own] == ["vanilla", "ours", *SELECTION_METHODS, "fastv", "pdrop", "sparsevlm"]
        vanilla = own[0]
        for row in own[1:]:
            assert row["budget"] == budget and row["kv_cache_mib"] < vanilla["kv_cache_mib"]
            assert row["flops_ratio"] > 1 or row["path"] == "cdpruner"  # a text tower wider than this tiny LLM
            assert row["total_mib"] == pytest.approx(row["weights_mib"] + row["peak_extra_mib"])
            assert row["memory_share"] == pytest.approx(row["total_mib"] / vanilla["total_mib"])
            if row["path"] in SELECTION_METHODS:
                assert row["visual_tokens"] == budget and row["selection"]["method"] == row["path"]
                assert row["overhead"]["share"] > 0 and (row["overhead"]["text_ms"] > 0) == (row["path"] == "cdpruner")
            elif row["path"] != "ours":
                assert row["overhead"] is None  # the in-LLM methods' scoring is in their FLOPs, not timed apart
        cdpruner, divprune = (next(r for r in own if r["path"] == n) for n in ("cdpruner", "divprune"))
        assert cdpruner["weights_mib"] > divprune["weights_mib"] == vanilla["weights_mib"]  # its CLIP text tower
    vispruner = next(r for r in rows if r["path"] == "vispruner")
    assert vispruner["selection"]["important_ratio"] == 0.25
    markdown = (tmp_path / "table.md").read_text()
    assert "| DivPrune | " in markdown and "(text tower " in markdown
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["methods"] == list(METHODS)
    capsys.readouterr()


def test_table7_preset_bigger_with_visionzip_against_smaller(tiny_presets, tmp_path, capsys) -> None:
    argv = ["--preset", "table7", "--budgets", "llava-next-7b=", "llava-next-13b=40,20", *SMALL_RUN,
            "--clock", "cpu", "--out", str(tmp_path)]  # fmt: skip
    result = main(argv)
    assert result["settings"]["clock"] == "cpu"
    rows = result["rows"]
    assert [(r["model"], r["path"], r["budget"]) for r in rows] == [
        ("llava-next-7b", "vanilla", 80), ("llava-next-13b", "vanilla", 80), ("llava-next-13b", "ours", 40),
        ("llava-next-13b", "ours", 20),
    ]  # fmt: skip
    small = rows[0]
    pairs = result["bigger_vs_smaller"]
    assert [(p["path"], p["budget"]) for p in pairs] == [("vanilla", 80), ("ours", 40), ("ours", 20)]
    for pair, row in zip(pairs, rows[1:], strict=True):
        assert pair["first_token"] == row["first_token_ms"] / small["first_token_ms"]
        assert pair["decode_per_token"] == row["decode_ms_per_token"] / small["decode_ms_per_token"]
        assert pair["memory"] == row["total_mib"] / small["total_mib"] and pair["paper"] is None
    assert pairs[0]["flops"] > 1 > pairs[2]["flops"]  # the bigger LLM costs more with every token, less at 20
    assert "against llava-next-7b with every token" in (tmp_path / "table.md").read_text()
    capsys.readouterr()


def test_bigger_vs_smaller_names_the_paper_at_640() -> None:
    def row(model, path, budget, ms):
        return {"model": model, "path": path, "budget": budget, "quant": None, "first_token_ms": ms,
                "decode_ms_per_token": ms / 10, "total_mib": ms * 2, "flops": {"first_token": ms * 3}}  # fmt: skip

    rows = [row("llava-next-7b@0.1", "vanilla", 2880, 100.0), row("llava-next-13b@0.1", "ours", 640, 50.0),
            row("llava-next-13b@0.1", "ours", 320, 40.0)]  # fmt: skip
    pairs = bigger_vs_smaller(rows)
    assert [p["first_token"] for p in pairs] == [0.5, 0.4] and pairs[0]["flops"] == 0.5
    assert pairs[0]["paper"] == pytest.approx(1246 / 1714) and pairs[1]["paper"] is None
    assert bigger_vs_smaller(rows[1:]) == []


def test_quantized_memory_rows(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setitem(shapes.PRESETS, "llava-next-7b", QUANT_NEXT)
    argv = ["--model", "llava-next-7b", "--budgets", "20", "--paths", "ours", "--quant", "8bit", "4bit", *SMALL_RUN,
            "--out", str(tmp_path)]  # fmt: skip
    rows = main(argv)["rows"]
    assert [(r["path"], r["quant"]) for r in rows] == [
        ("vanilla", None), ("ours", None), ("vanilla", "8bit"), ("ours", "8bit"), ("vanilla", "4bit"), ("ours", "4bit")
    ]  # fmt: skip
    weights = {r["quant"]: r["weights_mib"] for r in rows}
    assert weights[None] > weights["8bit"] > weights["4bit"]
    full = {r["quant"]: r["weights_full_shape_fp16_mib"] for r in rows}
    assert full == {q: shapes.counted_weights(QUANT_NEXT, torch.float16, q) / 2**20 for q in (None, "8bit", "4bit")}
    for row in rows[2:]:
        same = next(r for r in rows[:2] if r["path"] == row["path"])
        assert row["flops"] == same["flops"] and row["kv_cache_mib"] == same["kv_cache_mib"]
        assert row["memory_share"] == pytest.approx(row["total_mib"] / rows[0]["total_mib"])
    assert "ours, 8bit weights" in (tmp_path / "table.md").read_text()
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"multiples of 64 .* got a 32 -> 32 layer"):
        quantize_model(shapes.build_model(TINY_NEXT, CPU, torch.float32, "sdpa").model, "4bit")


def test_cpu_clock_counts_this_process_only(monkeypatch) -> None:
    ticks = iter([1.0, 1.25])
    monkeypatch.setitem(CLOCKS, "cpu", lambda: next(ticks))  # the clock StageClock reads, not time itself
    clock = StageClock(CPU, "cpu")
    clock.mark("start")
    clock.mark("encoder")
    assert clock.durations_ms() == {"encoder": 250.0}
    with pytest.raises(ValueError, match="CPU runs only"):
        StageClock(torch.device("cuda"), "cpu")
    with pytest.raises(ValueError, match="clock must be one of"):
        StageClock(CPU, "gpu")


def test_presets_expand_and_later_flags_override() -> None:
    argv = _preset_argv(["--scale", "0.5", "--preset", "table6", "--budgets", "640"])
    assert argv == [*RUN_PRESETS["table6"], "--scale", "0.5", "--budgets", "640"]
    assert _preset_argv(["--preset=table7"]) == RUN_PRESETS["table7"]
    assert _preset_argv(["--scale", "1"]) == ["--scale", "1"]
    with pytest.raises(SystemExit):
        main(["--preset", "table99"])
