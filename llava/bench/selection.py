"""The bench's rows for the encoder-side selections (DivPrune, VisPruner, CDPruner) and every encoder-side method's
own cost beside the encoder's: VisionZip's compression, a selection's choice (CDPruner's text tower included).

A selection's budget is its total per image, kept evenly per view (LLaVA-NeXT's 160 is 32 x 5, the references'
reading); the language model then sees exactly that many visual tokens (VisionZip's per-view layout, no newlines).
The own cost is timed apart from the request, on the same views: the encoder to LLaVA's layer (what every method
runs) against the method's step on its inputs (VisionZip: :func:`visionzip.compress` on the captured layer;
a selection: its relevance and :func:`select_views`), medians of ``repeat`` rounds; its FLOPs are counted by
``FlopCounterMode`` on that step (matrix products only, as the rest of :mod:`llava.bench.flops`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from llava.bench.measure import Case, Request, StageClock
from llava.bench.shapes import BenchModel, LlavaShape
from llava.model.selection import text_relevance
from visionzip import compress
from visionzip.baselines.select import needs_text, select_views
from visionzip.methods import SELECTION_METHODS, build_method


def selection_case(shape: LlavaShape, name: str, budget: int, options: dict[str, Any]) -> Case:
    """The row of selection ``name`` keeping ``budget`` tokens per image (``budget / views`` per view)."""
    if name not in SELECTION_METHODS:
        raise ValueError(f"{name!r} is not an encoder-side selection; expected one of {SELECTION_METHODS}")
    if budget % shape.views:
        raise ValueError(f"{name}: budget {budget} is not a multiple of {shape.name}'s {shape.views} views")
    return Case(name, budget, None, selection=build_method(name, budget // shape.views, **options))


def _median_ms(fn: Callable[[], Any], repeat: int, device: torch.device, clock: str) -> float:
    times = []
    for _ in range(repeat):
        marks = StageClock(device, clock)
        marks.mark("start")
        fn()
        marks.mark("end")
        times.append(marks.durations_ms()["end"])
    return statistics.median(times)


def _method_step(bench: BenchModel, case: Case, views: torch.Tensor, instructions: list[str]) -> Callable[[], Any]:
    """The method's own work on ``views`` (V, 3, H, W), its inputs computed once beforehand."""
    model, tower = bench.model, bench.tower
    if case.visionzip is not None:
        seen = tower.capture_visionzip(views.to(tower.dtype), case.visionzip)
        return lambda: compress(seen.features, seen.scores, seen.keys, case.visionzip)
    cfg = case.selection
    patches, attention = tower.forward_patches(views, cls_attention=cfg.name == "vispruner")  # (V, N, C), (V, N)
    projected = model.get_model().mm_projector(patches)  # (V, N, C_llm)

    def step() -> torch.Tensor:
        relevance = None
        if needs_text(cfg):
            relevance = text_relevance(model).relevance(patches, tower.post_layernorm, instructions)  # (V, N)
        return select_views(cfg, encoder=patches, cls_attention=attention, projected=projected, relevance=relevance)

    return step


def method_overhead(
    bench: BenchModel, case: Case, request: Request, repeat: int, device: torch.device, clock: str = "wall"
) -> dict:  # fmt: skip
    """The own cost of ``case``'s encoder-side method on the request's views (module docstring): ``encoder_ms``,
    ``method_ms`` (CDPruner: ``text_ms`` of it is the text tower), ``share`` = method / encoder, ``flops``."""
    shape = bench.shape
    side = shape.vision.image_size
    views = request.images.reshape(-1, 3, side, side)  # (B V, 3, H, W)
    instructions = [text for text in request.instructions for _ in range(shape.views)]
    tower = bench.tower
    with torch.inference_mode():
        bench.model.set_visionzip(None)
        encoder_ms = _median_ms(lambda: tower.forward_patches(views), repeat, device, clock)
        step = _method_step(bench, case, views, instructions)
        step()  # warm-up
        method_ms = _median_ms(step, repeat, device, clock)
        text_ms = 0.0
        if case.selection is not None and needs_text(case.selection):
            patches, _ = tower.forward_patches(views)
            relevance = text_relevance(bench.model)
            text_ms = _median_ms(
                lambda: relevance.relevance(patches, tower.post_layernorm, instructions), repeat, device, clock
            )
        with FlopCounterMode(display=False) as counter:
            step()
    return {
        "encoder_ms": encoder_ms, "method_ms": method_ms, "text_ms": text_ms, "share": method_ms / encoder_ms,
        "flops": counter.get_total_flops(),
    }  # fmt: skip
