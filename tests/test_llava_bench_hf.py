"""The benchmark's transformers path: transformers' VisionZip LLaVA classes on the bench model's weights, run beside
ours in the same cases: same token counts, cache sizes and first tokens, FLOPs as FlopCounterMode counts them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.bench import BATCH, CPU, DECODE, TEXT, TINY_15, TINY_NEXT
from torch.utils.flop_counter import FlopCounterMode

import llava.bench.shapes as shapes
from llava.bench.cli import main
from llava.bench.flops import path_flops
from llava.bench.measure import Case, StageClock, make_cases, make_request, run_request
from llava.bench.shapes import LlavaShape, build_model

SHAPES = pytest.mark.parametrize("shape", [TINY_15, TINY_NEXT], ids=["llava-1.5", "llava-next"])


@SHAPES
def test_hf_path_gives_our_first_token_counts_and_cache(shape: LlavaShape) -> None:
    """Every budget, and vanilla: transformers' class and ours see as many tokens, keep as large a cache and pick
    the same first token (fp32, random weights shared by both)."""
    bench = build_model(shape, CPU, torch.float32, "sdpa", hf=True)
    ours_q = bench.model.model.layers[0].self_attn.q_proj.weight
    assert bench.hf.model.language_model.layers[0].self_attn.q_proj.weight.data_ptr() == ours_q.data_ptr()  # shared
    request = make_request(shape, BATCH, TEXT, DECODE, CPU, torch.float32)
    cases = make_cases(shape, list(shape.budgets), paths=("ours", "hf"))
    assert [c.path for c in cases] == ["vanilla"] + ["ours", "hf"] * len(shape.budgets)
    pairs = [(cases[0], Case("hf", shape.full_budget, None)), *zip(cases[1::2], cases[2::2], strict=True)]
    with torch.no_grad():
        for ours_case, hf_case in pairs:
            ours, hf = (run_request(bench, case, request, StageClock(CPU)) for case in (ours_case, hf_case))
            assert (hf.seq_len, hf.kv_bytes) == (ours.seq_len, ours.kv_bytes), hf_case.label
            assert torch.equal(hf.first_token, ours.first_token), hf_case.label
            assert set(hf.ms) == set(ours.ms) == {"encoder", "projector", "input", "prefill", "decode"}


@SHAPES
def test_hf_flops_equal_flop_counter_mode(shape: LlavaShape) -> None:
    """transformers' forward does the matrix products :func:`path_flops` counts for the hf path (eager: dense)."""
    bench = build_model(shape, CPU, torch.float32, "eager", hf=True)
    request = make_request(shape, BATCH, TEXT, DECODE, CPU, torch.float32)
    for case in make_cases(shape, list(shape.budgets), paths=("hf",))[1:]:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run_request(bench, case, request, StageClock(CPU))
        flops = path_flops(shape, "hf", case.visionzip, BATCH, TEXT, DECODE, causal=False)
        assert counter.get_total_flops() == flops.first_token + flops.decode, case.label


def test_cli_rows_per_path(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(shapes.PRESETS, "llava-next-7b", TINY_NEXT)
    argv = ["--model", "llava-next-7b", "--paths", "ours", "hf", "--repeat", "1", "--warmup", "0",
            "--text-tokens", str(TEXT), "--decode-tokens", str(DECODE), "--out", str(tmp_path)]  # fmt: skip
    result = main(argv)
    rows = result["rows"]
    assert [(r["path"], r["budget"]) for r in rows] == [
        ("vanilla", 80),
        ("ours", 40),
        ("hf", 40),
        ("ours", 20),
        ("hf", 20),
    ]
    for ours, hf in zip(rows[1::2], rows[2::2], strict=True):
        for key in ("visual_tokens", "seq_len", "kv_cache_mib"):
            assert hf[key] == ours[key], key
        assert {k: hf["flops"][k] for k in ("encoder", "projector")} == {
            k: ours["flops"][k] for k in ("encoder", "projector")
        }
        assert hf["flops"]["prefill"] > ours["flops"]["prefill"]  # the <image> token's lm_head row
        assert hf["first_token_ms"] > 0 and hf["peak_extra_mib"] > 0 and hf["first_token_speedup"] > 0
    assert "| transformers' class |" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["paths"] == ["ours", "hf"]
    with pytest.raises(SystemExit):  # transformers' classes place the kept tokens packed only
        main([*argv[:5], "--positions", "original", "--out", str(tmp_path)])
    capsys.readouterr()
