"""The bench's rows for the methods that prune inside the language model (FastV, PDrop, SparseVLM): each config at
a budget, SparseVLM's scale calibrated on the bench's own prompt, and what each row's FLOPs count needs.

A budget is read in one of two ways, recorded in every row:
- ``average``: the layer-average of visual tokens over the decoder layers (inputs convention), the VisionZip
  paper's Tables 1-2 reading (:func:`visionzip.methods.build_method`): FastV solves its kept count for the image's
  own token count, PDrop and SparseVLM take their presets (192/128/64; SparseVLM's count depends on the data).
- ``kept``: the visual tokens the layer after the method's first cut takes in (FastV keeps ``budget`` after layer
  K-1; PDrop's first stage keeps ``budget``, lambda = budget / N; SparseVLM's scale is calibrated so that its first
  cut, recycled clusters included, leaves ``budget``). Table 4's FastV and SparseVLM rows on LLaVA-NeXT-7B at 160
  can only mean this: two layers on 2,880 tokens already average 180 over 32.
- ``auto``: ``average`` where the method's config can meet it, else ``kept`` (the refusal is kept in the row).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from llava.bench.flops import PrunedRun
from llava.bench.measure import Case, Request
from llava.bench.shapes import BenchModel, LlavaShape, visual_tokens
from visionzip.baselines import PruneConfig, layer_average
from visionzip.baselines.pdrop import PDropConfig
from visionzip.baselines.sparsevlm import SparseVLMConfig, calibrate_scale, rater_mask
from visionzip.methods import LLM_METHODS, build_method

logger = logging.getLogger("llava.bench")
READINGS = ("auto", "average", "kept")


@dataclass(frozen=True)
class MethodCase:
    """An in-LLM row before the model exists: its case, whether SparseVLM's scale is still to be calibrated on the
    bench's prompt (to ``budget`` in the case's reading), and why ``auto`` did not read the budget as an average."""

    case: Case
    calibrate: bool = False
    refused: str | None = None


def _average_config(name: str, budget: int, tokens: int, layers: int, options: dict[str, Any]) -> PruneConfig:
    """The config meeting a layer-average of ``budget`` on an image of ``tokens`` tokens (ValueError: it cannot)."""
    cfg = build_method(name, budget, **options)
    if name == "fastv":  # the kept count for this image's own count, so the row names it
        (keep,) = cfg.kept_after(tokens, layers).values()
        cfg = dataclasses.replace(cfg, budget=None, keep=keep)
    elif name == "pdrop":
        cfg.kept_after(tokens, layers)
    return cfg


def _kept_config(name: str, budget: int, tokens: int, options: dict[str, Any]) -> PruneConfig:
    """The config whose first cut leaves ``budget`` of ``tokens`` visual tokens (SparseVLM's: before calibration)."""
    if not 0 < budget < tokens:
        raise ValueError(f"{name}: {budget} tokens kept after the first cut must be in 1..{tokens - 1}")
    if name == "fastv":
        return build_method("fastv", keep=budget, **options)
    if name == "pdrop":
        ratio = budget / tokens
        while int(tokens * ratio) < budget:  # int() of the stage's count must not round below the budget
            ratio = math.nextafter(ratio, 1.0)
        return build_method("pdrop", layers=options.pop("layers", PDropConfig.layers), ratio=ratio, **options)
    return build_method("sparsevlm", scale=1.0, bias=options.pop("bias", 0.0), **options)


def method_case(
    shape: LlavaShape, name: str, budget: int, reading: str, options: dict[str, Any], calibrate: bool = False
) -> MethodCase:  # fmt: skip
    """The row of in-LLM method ``name`` at ``budget`` on ``shape`` (``reading``: see the module docstring;
    ``calibrate``: SparseVLM's scale fitted to an average budget too, not only to a kept one)."""
    if name not in LLM_METHODS:
        raise ValueError(f"{name!r} is not a method inside the language model; expected one of {LLM_METHODS}")
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    tokens, layers, refused = visual_tokens(shape, None), shape.language.layers, None
    if reading in ("auto", "average"):
        try:
            cfg = _average_config(name, budget, tokens, layers, dict(options))
            return MethodCase(Case(name, budget, None, cfg, "average"), calibrate and name == "sparsevlm")
        except ValueError as err:
            if reading == "average":
                raise
            refused = str(err)
    cfg = _kept_config(name, budget, tokens, dict(options))
    return MethodCase(Case(name, budget, None, cfg, "kept"), name == "sparsevlm", refused)


def first_cut(cfg: PruneConfig, tokens: int, layers: int) -> int:
    """The 0-based layer after which ``cfg`` first cuts."""
    return cfg.layers[0] if cfg.scored_by == "raters" else min(cfg.kept_after(tokens, layers))


def measured_counts(bench: BenchModel, request: Request, cfg: PruneConfig) -> list[int]:
    """Visual tokens per decoder layer of one prefill of the bench's request with ``cfg`` (the most of any row)."""
    model = bench.model
    model.set_visionzip(None)
    model.set_pruning(cfg)
    with torch.inference_mode():
        batch = model.multimodal_batch(request.input_ids, None, None, request.images, request.image_sizes)
        model(inputs_embeds=batch.inputs_embeds, image_ids=batch.image_ids, use_cache=False, logits_to_keep=1)
    return model.get_model().visual_counts.max(dim=0).values.tolist()


def calibrated(bench: BenchModel, request: Request, item: MethodCase) -> Case:
    """``item``'s case with SparseVLM's scale fitted on the bench's request (:func:`calibrate_scale`): the count after
    its first cut (``kept``) or its layer-average over inputs (``average``) closest to the budget."""
    case = item.case
    if not item.calibrate:
        return case
    tokens, layers = visual_tokens(bench.shape, None), bench.shape.language.layers
    after = first_cut(case.pruning, tokens, layers) + 1

    def measure(cfg: SparseVLMConfig) -> float:
        counts = measured_counts(bench, request, cfg)
        return counts[after] if case.reading == "kept" else layer_average(counts)[0]

    cfg, reached = calibrate_scale(measure, case.budget, case.pruning)
    logger.info("sparsevlm @ %d (%s): scale %.4g reaches %.1f", case.budget, case.reading, cfg.scale, reached)
    return dataclasses.replace(case, pruning=cfg)


def rater_counts(bench: BenchModel, request: Request) -> tuple[int, int]:
    """(SparseVLM's raters, the text tokens after the image they are chosen from) of the bench's request: the most of
    any row, as the model pads its scoring rows (:func:`visionzip.baselines.sparsevlm.rater_mask`)."""
    model = bench.model
    model.set_visionzip(None)
    with torch.inference_mode():
        batch = model.multimodal_batch(request.input_ids, None, None, request.images, request.image_sizes)
    raters, text = 0, 0
    for embeds, ids, mask in zip(batch.inputs_embeds, batch.image_ids, batch.attention_mask.bool(), strict=True):
        image = ids >= 0
        after = torch.arange(ids.shape[0], device=ids.device) > image.nonzero()[0, 0]
        candidates = mask & ~image & after
        raters = max(raters, int(rater_mask(embeds, image, candidates).sum()))
        text = max(text, int(candidates.sum()))
    return raters, text


def pruned_run(shape: LlavaShape, case: Case, counts: list[int], raters: tuple[int, int]) -> PrunedRun:
    """What the FLOPs count of ``case`` needs: the measured per-layer ``counts``, the layers that scored, the query
    rows (``raters``: :func:`rater_counts`, read for SparseVLM only)."""
    cfg, layers = case.pruning, shape.language.layers
    if cfg.scored_by == "raters":
        return PrunedRun(tuple(counts), cfg.layers, raters[0], raters[1])
    return PrunedRun(tuple(counts), tuple(sorted(cfg.kept_after(counts[0], layers))), 1)


def describe(cfg: PruneConfig) -> str:
    """The row's setting in a few words: K and the kept count, PDrop's stages and lambda, SparseVLM's scale/bias."""
    if cfg.name == "fastv":
        return f"K={cfg.layer}, keep {cfg.keep}"
    if cfg.name == "pdrop":
        return f"layers {'/'.join(map(str, cfg.layers))}, lambda {cfg.ratio:.3g}"
    return f"layers {'/'.join(map(str, cfg.layers))}, scale {cfg.scale:.3g}, bias {cfg.bias:g}"
