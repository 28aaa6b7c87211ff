"""llava.bench.train: vanilla and VisionZip stage-2 steps, interleaved on the same weights and batch, on tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.bench import BATCH, CPU, TEXT, TINY_15, TINY_NEXT
from torch.utils.flop_counter import FlopCounterMode

from llava.bench import train as train_bench
from llava.bench.measure import Case
from llava.bench.shapes import view_config

# By hand, for the tiny shapes (16 px views, patch 4): a view is 4 x 4 = 16 patches. LLaVA-1.5: 16. NeXT's 2 x 2
# crops: the base view's 16, the stitched crops' 8 rows x 8 columns = 64, one image_newline per row: 8.
VANILLA_VISUAL = {"llava-1.5-7b": 16, "llava-next-7b": 16 + 64 + 8}
BUDGETS = {"llava-1.5-7b": [8, 4], "llava-next-7b": [40]}


def _args(*extra: str):
    return train_bench._parse(["--device", "cpu", "--deepspeed", "none", "--repeat", "2", "--text-tokens", str(TEXT),
                               "--batch", str(BATCH), *extra])  # fmt: skip


@pytest.fixture(scope="module")
def result() -> dict:
    return train_bench.run({"llava-1.5-7b": TINY_15, "llava-next-7b": TINY_NEXT}, BUDGETS, _args())


def _rows(result: dict, model: str) -> list[dict]:
    return [row for row in result["rows"] if row["model"] == model]


@pytest.mark.parametrize("model", sorted(BUDGETS))
def test_each_case_trains_on_its_own_token_count(result: dict, model: str) -> None:
    rows = _rows(result, model)
    assert [row["case"] for row in rows] == [
        f"vanilla@{rows[0]['budget']}",
        *(f"visionzip@{b}" for b in BUDGETS[model]),
    ]
    assert rows[0]["seq_len"] == TEXT + VANILLA_VISUAL[model]
    assert [row["seq_len"] for row in rows[1:]] == [TEXT + budget for budget in BUDGETS[model]]


@pytest.mark.parametrize("model", sorted(BUDGETS))
def test_every_step_starts_from_the_same_weights(result: dict, model: str) -> None:
    """Learning rate 0: each case's loss is the same in every round (the same weights, the same batch), and the
    cases' losses differ (the compressed sequence is another input)."""
    rows = _rows(result, model)
    assert all(len(row["losses"]) == 2 and row["losses"][0] == row["losses"][1] for row in rows)
    assert len({row["losses"][0] for row in rows}) == len(rows)


@pytest.mark.parametrize("model", sorted(BUDGETS))
def test_memory_and_ratios(result: dict, model: str) -> None:
    rows = _rows(result, model)
    vanilla = rows[0]
    for row in rows:
        assert row["resident_mib"] == pytest.approx(vanilla["resident_mib"], rel=1e-3)  # one model, one optimizer
        assert row["peak_mib"] == pytest.approx(row["resident_mib"] + row["step_peak_mib"])
        assert row["time_ratio"] == pytest.approx(vanilla["step_ms"] / row["step_ms"])
        assert row["memory_ratio"] == pytest.approx(vanilla["peak_mib"] / row["peak_mib"])
        assert row["samples_per_s"] == pytest.approx(BATCH / row["step_ms"] * 1e3)
        assert row["flops_ratio"] == pytest.approx(vanilla["flops"] / row["flops"])
    assert all(row["step_peak_mib"] < vanilla["step_peak_mib"] for row in rows[1:]), "fewer tokens, less memory"


def test_the_trainee_is_set_up_as_the_scripts_set_up_stage_2() -> None:
    """The scripts' YAML (gradient checkpointing, clipping, weight decay), the LLM and projector trainable, the tower
    frozen; AdamW's state is resident after a step and the weights are unchanged by it (learning rate 0)."""
    args = train_bench.training_arguments(TINY_15, BATCH, None, True, cuda=False)
    assert args.gradient_checkpointing and args.learning_rate == 0 and args.weight_decay == 0.0
    trainee = train_bench.build_trainee(TINY_15, args, CPU, "sdpa")
    model = trainee.model
    assert model.is_gradient_checkpointing
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "vision_tower" not in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = train_bench.train_batch(train_bench.make_request(TINY_15, BATCH, TEXT, 0, CPU, torch.float32))
    train_bench.train_step(trainee, Case("visionzip", 8, view_config(TINY_15, 8)), batch)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    state = [t for s in trainee.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(t.numel() * t.element_size() for t in state if t.dim() > 0)
    trained = [model.get_parameter(n) for n in trainable]
    assert moments == 2 * sum(p.numel() * p.element_size() for p in trained)  # exp_avg, exp_avg_sq
    assert train_bench.resident_bytes(CPU) >= params + moments


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
@pytest.mark.parametrize("shape", [TINY_15, TINY_NEXT], ids=lambda shape: shape.name)
def test_step_flops_equal_flop_counter_mode(shape, checkpointing: bool) -> None:
    """An independent count: torch's FlopCounterMode over one whole step (forward, the checkpointed recompute,
    backward, AdamW), eager attention so that it sees every product (dense), vanilla and VisionZip."""
    args = train_bench.training_arguments(shape, BATCH, None, checkpointing, cuda=False)
    trainee = train_bench.build_trainee(shape, args, CPU, "eager")
    batch = train_bench.train_batch(train_bench.make_request(shape, BATCH, TEXT, 0, CPU, torch.float32))
    budget = shape.budgets[0]
    for case in (Case("vanilla", shape.full_budget, None), Case("visionzip", budget, view_config(shape, budget))):
        with FlopCounterMode(display=False) as counter:
            train_bench.train_step(trainee, case, batch)
        expected = train_bench.train_flops(shape, case.visionzip, BATCH, TEXT, checkpointing, causal=False)
        assert counter.get_total_flops() == expected, case.label


def test_resident_bytes_counts_each_storage_once() -> None:
    start = train_bench.resident_bytes(CPU)
    block = torch.zeros(1 << 20, dtype=torch.float32)  # 4 MiB
    views = [block[: 1 << 10], block.view(1024, 1024), block[1:]]
    assert train_bench.resident_bytes(CPU) - start == block.numel() * 4
    del block, views


def test_zero3_is_refused_with_the_stage(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _args("--deepspeed", str(train_bench.ROOT / "configs/deepspeed/zero3.json"))
    assert "ZeRO stage 3; expected one of (0, 1, 2)" in capsys.readouterr().err


def test_the_paper_line_appears_for_its_model_and_budget(result: dict) -> None:
    paper = train_bench.PAPER_TABLE17
    assert round(paper.time_ratio, 2) == 2.13 and round(paper.memory_ratio, 2) == 1.80
    assert "Here," not in train_bench.render_markdown(result)  # the tiny NeXT runs 40, not 640
    row = {**_rows(result, "llava-next-7b")[1], "budget": 640, "time_ratio": 2.5, "memory_ratio": 1.5}
    text = train_bench.render_markdown({**result, "rows": [row]})
    assert "step time 2.50x (paper 2.13x), peak memory 1.50x (paper 1.80x)" in text


@pytest.mark.slow
def test_cli_with_zero2_on_cpu(tmp_path: Path) -> None:
    """The command as the README gives it, DeepSpeed ZeRO-2 from configs/ on its CPU accelerator, in a subprocess
    (DeepSpeed starts a process group)."""
    pytest.importorskip("deepspeed")
    argv = ["--model", "llava-1.5-7b", "--scale", "0.02", "--budgets", "64", "--text-tokens", "8", "--repeat", "1",
            "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "llava.bench.train", *argv], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["deepspeed"] == "zero2.json" and saved["settings"]["gradient_checkpointing"] is True
    assert [row["seq_len"] for row in saved["rows"]] == [576 + 8, 64 + 8]
    assert saved["rows"][1]["step_peak_mib"] < saved["rows"][0]["step_peak_mib"]
    assert "| visionzip@64 | 72 |" in (tmp_path / "table.md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_bf16_and_the_allocator_peak() -> None:
    result = train_bench.run({"llava-next-7b": TINY_NEXT}, {"llava-next-7b": [40]}, _args("--device", "cuda"))
    assert result["settings"]["dtype"] == "bfloat16" and result["settings"]["gpu"]
    rows = result["rows"]
    assert all(row["peak_mib"] > row["resident_mib"] > 0 for row in rows)
    assert rows[1]["step_peak_mib"] < rows[0]["step_peak_mib"]
