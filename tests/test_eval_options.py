"""eval.options: llava_visionzip's --model_args as lmms-eval parses them, validated into VisionZip settings."""

from __future__ import annotations

import pytest
import torch

from eval.options import ModelOptions
from eval.runner import cut_at_stops, generation_settings
from visionzip import VisionZipConfig
from visionzip.baselines import FastVConfig, PDropConfig, SparseVLMConfig


def test_model_args_as_lmms_eval_parses_them() -> None:
    # lmms-eval turns "54" into 54, "-2" into -2.0 (str.isnumeric is False) and "true" into True
    options = ModelOptions.from_kwargs(
        pretrained="ckpt", dominant=54, contextual=10, layer=-2.0, greedy="false", batch_size="4", dtype="bfloat16"
    )
    assert (options.dominant, options.contextual, options.layer, options.greedy) == (54, 10, -2, False)
    assert options.batch_size == 4 and options.torch_dtype is torch.bfloat16
    assert options.requested_visionzip(select_layer=-2) == VisionZipConfig(54, 10, layer=-2)


def test_budget_is_the_paper_split() -> None:
    for budget, split in {64: (54, 10), 128: (108, 20), 192: (162, 30), 32: (27, 5)}.items():
        cfg = ModelOptions.from_kwargs(pretrained="ckpt", budget=budget).requested_visionzip(select_layer=-2)
        assert cfg is not None and (cfg.dominant, cfg.contextual) == split


def test_visionzip_off_by_default_and_layer_follows_the_tower() -> None:
    assert ModelOptions(pretrained="ckpt").requested_visionzip(select_layer=-2) is None
    cfg = ModelOptions(pretrained="ckpt", budget=64, merge="mean").requested_visionzip(select_layer=-3)
    assert cfg is not None and cfg.layer == -3 and cfg.merge == "mean"


def test_a_budget_on_a_saved_stage_keeps_its_other_options_as_the_command_line_does() -> None:
    """A VisionZip-FT checkpoint saved with positions='original' is evaluated at another budget in its own layout,
    by lmms-eval's model args and by run_llava's flags alike (one rule, visionzip.config.requested_stage)."""
    import argparse
    from types import SimpleNamespace

    from llava import cli_options

    saved = VisionZipConfig(6, 2, layer=-2, positions="original", selection="random")
    expected = VisionZipConfig(54, 10, layer=-2, positions="original", selection="random")
    assert ModelOptions(pretrained="ckpt", budget=64).requested_visionzip(-2, saved) == expected
    assert ModelOptions(pretrained="ckpt", dominant=54, contextual=10).requested_visionzip(-2, saved) == expected
    model = SimpleNamespace(config=SimpleNamespace(visionzip_config=lambda: saved),
                            get_vision_tower=lambda: SimpleNamespace(select_layer=-2))  # fmt: skip
    flags = argparse.Namespace(visionzip_dominant=54, visionzip_contextual=10, visionzip_positions=None)
    assert cli_options.requested_visionzip(flags, model) == expected
    merged = ModelOptions(pretrained="ckpt", budget=64, merge="mean").requested_visionzip(-2, saved)
    assert merged == VisionZipConfig(**{**expected.to_dict(), "merge": "mean"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dominant": 54}, "together"),
        ({"budget": 64, "dominant": 54, "contextual": 10}, "not both"),
        ({"visionzip_budget": "crop"}, "visionzip_budget"),
        ({"merge": "max"}, "merge"),
        ({"dtype": "fp8"}, "dtype"),
        ({"dominant": 5.5, "contextual": 1}, "integer"),
        ({"batch_size": "four"}, "integer"),
        ({"greedy": "maybe"}, "true or false"),
        ({"temperature": 0.2}, "unknown model_args"),
    ],
)
def test_bad_model_args_say_what_was_expected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelOptions.from_kwargs(pretrained="ckpt", **kwargs)


def test_generation_settings_greedy_unless_asked() -> None:
    task = {"until": "ASSISTANT:", "max_new_tokens": 16, "temperature": 0.2, "top_p": 0.9, "image_aspect_ratio": "pad"}
    greedy = generation_settings(task, greedy=True, default_max_new_tokens=1024)
    assert greedy.kwargs["do_sample"] is False and greedy.kwargs["max_new_tokens"] == 16
    assert greedy.stops == ["ASSISTANT:"]
    sampled = generation_settings(task, greedy=False, default_max_new_tokens=1024)
    assert sampled.kwargs["do_sample"] is True and sampled.kwargs["temperature"] == pytest.approx(0.2)
    assert generation_settings({}, True, 7).kwargs["max_new_tokens"] == 7
    with pytest.raises(ValueError, match="unsupported generation_kwargs"):
        generation_settings({"repetition_penalty": 1.1}, True, 7)


def test_cut_at_stops() -> None:
    assert cut_at_stops(" red\nASSISTANT: blue", ["ASSISTANT:", "\n"]) == "red"
    assert cut_at_stops("circle ", []) == "circle"


def test_baseline_options_reach_the_config() -> None:
    opts = ModelOptions.from_kwargs(
        pretrained="p", dominant=6, contextual=1, cls_token="False", selection="random", score_layer=-5.0
    )
    cfg = opts.requested_visionzip(select_layer=-2)
    assert (cfg.cls_token, cfg.selection, cfg.tokens, cfg.score_layer, cfg.layer) == (False, "random", 7, -5, -2)
    with pytest.raises(ValueError, match="selection"):
        ModelOptions.from_kwargs(pretrained="p", budget=64, selection="best")


# --- method=: the in-LLM methods (FastV, PDrop, SparseVLM) beside VisionZip ------------------------------------------
def test_method_args_build_the_methods_config() -> None:
    """lmms-eval's parsed values (ints, floats, text such as "2/8/16") reach the method's config, typed."""
    fastv = ModelOptions.from_kwargs(pretrained="p", method="fastv", budget=192, fastv_layer=3.0)
    assert fastv.requested_pruning() == FastVConfig(layer=3, budget=192) and fastv.nominal_budget() == 192
    pdrop = ModelOptions.from_kwargs(pretrained="p", method="pdrop", pdrop_layers="2/8/16", pdrop_ratio=0.5)
    assert pdrop.requested_pruning() == PDropConfig(layers=(2, 8, 16), ratio=0.5) and pdrop.nominal_budget() is None
    sparse = ModelOptions.from_kwargs(pretrained="p", method="sparsevlm", budget=128, sparsevlm_recycle=False)
    assert sparse.requested_pruning() == SparseVLMConfig(scale=9.0, bias=6.0, recycle=False)  # the 128 preset
    assert sparse.requested_visionzip(select_layer=-2) is None  # VisionZip is off beside an in-LLM method
    assert ModelOptions.from_kwargs(pretrained="p", method="fastv", fastv_keep=30).nominal_budget() is None


def test_method_alone_runs_at_the_default_budget() -> None:
    assert ModelOptions(pretrained="p", method="fastv").requested_pruning() == FastVConfig(layer=2, budget=64)
    assert ModelOptions(pretrained="p", method="pdrop").requested_pruning() == PDropConfig((2, 8, 16), ratio=0.19)
    assert ModelOptions(pretrained="p", method="fastv").nominal_budget() == 64
    # method=visionzip alone: the paper's 64 = 54+10, unless the checkpoint saves its own stage (VisionZip‡)
    only = ModelOptions(pretrained="p", method="visionzip")
    assert only.requested_visionzip(-2) == VisionZipConfig(54, 10, layer=-2) and only.requested_pruning() is None
    assert only.requested_visionzip(-2, saved=VisionZipConfig(27, 5, layer=-2)) is None  # the saved one applies
    assert ModelOptions(pretrained="p", budget=64).requested_visionzip(-2) == VisionZipConfig(54, 10, layer=-2)


def test_an_in_llm_method_on_a_visionzip_checkpoint_needs_visionzip_off() -> None:
    saved = VisionZipConfig(54, 10, layer=-2)
    with pytest.raises(ValueError, match=r"saves VisionZip 54\+10 .* expected visionzip=off"):
        ModelOptions(pretrained="p", method="fastv").requested_visionzip(-2, saved)
    off = ModelOptions.from_kwargs(pretrained="p", method="fastv", visionzip="off", budget=128)
    assert off.requested_visionzip(-2, saved) is None and off.requested_pruning() == FastVConfig(budget=128)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "fastvv"}, "method must be one of"),
        ({"fastv_layer": 3}, r"\['fastv_layer'\] are options of method=fastv, but method=None"),
        ({"method": "pdrop", "fastv_layer": 3}, "options of method=fastv, but method=pdrop"),
        ({"method": "fastv", "fastv_k": 3}, "fastv_k=3: fastv has no option 'k'"),
        ({"method": "fastv", "fastv_layer": "two"}, "fastv_layer='two'"),
        ({"method": "fastv", "dominant": 54, "contextual": 10}, "are VisionZip's, but method=fastv"),
        ({"method": "pdrop", "merge": "mean"}, "are VisionZip's"),
        ({"method": "sparsevlm", "budget": 100}, "method=sparsevlm,budget=100: SparseVLM presets are"),
        ({"method": "fastv", "budget": 64, "fastv_keep": 10}, "budget and keep both set the count"),
        ({"method": "fastv", "fastv_ratio": 1.5}, "ratio R .* must be in"),
        ({"method": "visionzip", "visionzip": "off"}, "method=visionzip with visionzip=off"),
        ({"method": "fastv", "multiturn": "frozen"}, "multiturn must be one of"),
        ({"visionzip_dominant": 54}, "unknown model_args"),
    ],
)
def test_bad_method_args_are_refused_naming_the_arg(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelOptions.from_kwargs(pretrained="ckpt", **kwargs)


def test_multiturn_is_recorded_and_transformers_classes_refuse_in_llm_methods() -> None:
    assert ModelOptions(pretrained="p").multiturn == "cache"
    assert ModelOptions.from_kwargs(pretrained="p", method="pdrop", multiturn="reprefill").multiturn == "reprefill"
    ModelOptions(pretrained="p", method="visionzip").refuse_llm_method("llava_hf_visionzip")  # VisionZip: fine
    ModelOptions(pretrained="p", method="fastv").refuse_llm_method("llava_hf_visionzip")  # runs it (owned loop)
    with pytest.raises(
        ValueError, match=r"method=fastv prunes inside the language model, .* llava_onevision_visionzip"
    ):
        ModelOptions(pretrained="p", method="fastv").refuse_llm_method("llava_onevision_visionzip")
