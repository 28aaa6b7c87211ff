"""The one method argument: names -> configs, budgets and typed options, refusals that name what was expected."""

from __future__ import annotations

import pytest

from visionzip import VisionZipConfig
from visionzip.baselines import FastVConfig, PDropConfig, SparseVLMConfig
from visionzip.methods import DEFAULT_BUDGET, METHODS, build_method, method_name, option_types, parse_option


def test_every_method_runs_alone_at_the_default_budget() -> None:
    built = {name: build_method(name) for name in METHODS}
    assert built["visionzip"] == VisionZipConfig.from_budget(DEFAULT_BUDGET) == VisionZipConfig(54, 10)
    assert built["fastv"] == FastVConfig(layer=2, budget=64)
    assert built["pdrop"] == PDropConfig.from_budget(64)
    assert built["sparsevlm"] == SparseVLMConfig.from_budget(64)
    assert [method_name(cfg) for cfg in built.values()] == list(METHODS)


def test_budgets_and_options() -> None:
    assert build_method("visionzip", 128) == VisionZipConfig(108, 20)
    assert build_method("fastv", 192, layer=3) == FastVConfig(layer=3, budget=192)
    assert build_method("fastv", keep=30) == FastVConfig(keep=30)
    assert build_method("pdrop", layers=(8, 16, 24), ratio=0.5) == PDropConfig.from_budget("released")
    assert build_method("sparsevlm", 192, recycle=False) == SparseVLMConfig(scale=13.5, bias=0.0, recycle=False)
    assert build_method("visionzip", dominant=6, contextual=2) == VisionZipConfig(6, 2)


def test_options_are_typed_from_the_configs() -> None:
    assert parse_option("pdrop", "layers", "2/8/16") == (2, 8, 16) == parse_option("pdrop", "layers", "2,8,16")
    assert parse_option("fastv", "keep", "30") == 30 and parse_option("fastv", "ratio", "0.5") == 0.5
    assert parse_option("sparsevlm", "recycle", "false") is False
    assert parse_option("visionzip", "positions", "original") == "original"
    assert set(option_types("fastv")) == {"layer", "budget", "keep", "ratio", "positions"}


def test_bad_arguments_are_refused_with_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'fast'; expected one of \['visionzip', 'divprune'"):
        build_method("fast")
    with pytest.raises(ValueError, match="a budget and keep both set the count"):
        build_method("fastv", 64, keep=30)
    with pytest.raises(ValueError, match="PDrop presets are"):
        build_method("pdrop", 100)
    with pytest.raises(ValueError, match="fastv has no option 'k'"):
        parse_option("fastv", "k", "2")
    with pytest.raises(ValueError, match="takes true or false"):
        parse_option("sparsevlm", "recycle", "maybe")


def test_encoder_side_selections_build_from_a_budget_and_reload_from_config_json() -> None:
    from visionzip.baselines.select import selection_from_dict

    cfg = build_method("vispruner", 128, important_ratio=0.75)
    assert (cfg.tokens, cfg.important) == (128, 96)
    assert build_method("divprune").tokens == 64 and build_method("cdpruner", tokens=32).tokens == 32
    for made in (cfg, build_method("divprune", 192), build_method("cdpruner", 64)):
        assert selection_from_dict(made.to_dict()) == made
    with pytest.raises(ValueError, match=r"divprune keeps a whole number of tokens per image; got a budget of 64\.5"):
        build_method("divprune", 64.5)
    with pytest.raises(ValueError, match="a budget and tokens both set the count"):
        build_method("cdpruner", 64, tokens=32)
    with pytest.raises(ValueError, match="needs 'method' in"):
        selection_from_dict({"method": "fastv", "layer": 2})


def test_select_views_asks_for_what_each_method_reads_and_checks_the_budget() -> None:
    import torch

    from visionzip.baselines.select import gather_kept, select_views

    feats = torch.randn(2, 9, 4)
    with pytest.raises(ValueError, match="vispruner selects from encoder, cls_attention; not given: cls_attention"):
        select_views(build_method("vispruner", 4), encoder=feats)
    with pytest.raises(ValueError, match=r"keeps 10 tokens, but an image here has 9"):
        select_views(build_method("divprune", 10), projected=feats)
    keep = select_views(build_method("divprune", 9), projected=feats)  # keep-all: every patch, in raster order
    assert keep.tolist() == [list(range(9))] * 2 and torch.equal(gather_kept(feats, keep), feats)
