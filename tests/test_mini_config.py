"""The miniature's comparison rows: each method's model args, read as the lmms-eval plugin reads them, keep exactly
the row's token count (checked with the method configs' own counting) and name rows of the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.mini.config import COMPARISON_METHODS, FULL_TOKENS, Paths, ReproConfig, comparison_args, spec_rows
from eval.mini.report import comparisons
from visionzip.methods import LLM_METHODS, SELECTION_METHODS, build_method, parse_option

LLM_LAYERS = 2  # eval.mini.base's tiny Llama


def _config(args: dict) -> object:
    """The method config the plugin builds from the row's model args (``<method>_<option>`` typed from text)."""
    method = args["method"]
    options = {k.split("_", 1)[1]: parse_option(method, k.split("_", 1)[1], str(v)) for k, v in args.items()
               if k.startswith(f"{method}_")}  # fmt: skip
    return build_method(method, args.get("budget"), **options)


@pytest.mark.parametrize("tokens", range(1, FULL_TOKENS))
def test_every_comparison_row_keeps_its_token_count(tokens: int) -> None:
    for name, method in COMPARISON_METHODS.items():
        cfg = _config(comparison_args(name, tokens))
        if method in SELECTION_METHODS:
            assert cfg.tokens == tokens
        elif method == "sparsevlm":  # its count follows the rank of the raters' attention: at most every token
            assert {cfg.keep_count(rank, FULL_TOKENS) for rank in range(1, FULL_TOKENS)} == {tokens}
            assert cfg.layers == (0,) and not cfg.recycle
        else:
            assert method in LLM_METHODS
            assert cfg.kept_after(FULL_TOKENS, LLM_LAYERS) == {0: tokens}  # after the first layer, the only cut


def test_comparison_rows_in_the_spec_and_the_tests(tmp_path: Path) -> None:
    cfg = ReproConfig()
    rows = spec_rows(cfg, Paths(tmp_path))
    names = {(r["method"], r["tokens"]) for r in rows}
    assert {(m, n) for m in COMPARISON_METHODS for n in cfg.budgets} <= names
    pairs = comparisons(cfg.layouts, cfg.comparisons)
    assert [(m, "VisionZip") for m in COMPARISON_METHODS] == pairs[-len(COMPARISON_METHODS) :]
    assert len(spec_rows(ReproConfig(comparisons=()), Paths(tmp_path))) == len(rows) - 6 * len(cfg.budgets)
    with pytest.raises(ValueError, match="comparisons must be among"):
        ReproConfig(comparisons=("ToMe",))


def test_versus_visionzip_sorts_each_split_by_verdict(tmp_path: Path) -> None:
    import csv

    from eval.mini.report import versus_visionzip
    from eval.tables.seeds import CSV_HEADER

    tests = [("FastV", "small", 7, -4.0, "worse"), ("FastV", "small", 14, 1.0, "indistinguishable"),
             ("DivPrune", "small", 7, 3.5, "better"), ("DivPrune", "easy", 7, 0.2, "indistinguishable"),
             ("Random patches", "small", 7, -9.0, "worse")]  # fmt: skip
    path = tmp_path / "seeds.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_HEADER)
        writer.writeheader()
        writer.writerow({"table": "summary", "method": "FastV", "column": "small"})
        for method, column, tokens, diff, verdict in tests:
            b = "VisionZip" if method != "Random patches" else "Dominant only"
            writer.writerow({"table": "comparison", "method": method, "method_b": b, "tokens": tokens,
                             "column": column, "diff": diff, "verdict": verdict})  # fmt: skip
    text = versus_visionzip(path, ["FastV", "DivPrune"])
    assert (
        "- **small**: better: DivPrune (7: +3.5). worse: FastV (7: -4.0). indistinguishable: FastV (14: +1.0)." in text
    )
    assert "- **easy**: better: none. worse: none. indistinguishable: DivPrune (7: +0.2)." in text
    assert "Random patches" not in text and versus_visionzip(path, ["PDrop"]) == ""
