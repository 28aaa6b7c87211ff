"""One request through LLaVA with per-stage clocks, and the interleaved, warmed-up, median timing of all cases."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from llava.bench.hf import hf_image_kwargs, hf_inputs
from llava.bench.shapes import BenchModel, LlavaShape, use_tower, view_config, visual_tokens
from llava.constants import IMAGE_TOKEN_INDEX
from visionzip.baselines import PruneConfig
from visionzip.baselines.select import SelectionConfig
from visionzip.bench import measure_memory
from visionzip.config import VisionZipConfig

# Stages in the order a request passes them; each ends at the clock mark of the same name.
STAGES = ("encoder", "projector", "input", "prefill", "decode")
FIRST_TOKEN_STAGES = ("encoder", "projector", "input", "prefill")
FIRST_TEXT_ID = 3  # Llama's ids 0, 1, 2 are <unk>, <s>, </s>
VISIONZIP_PATHS = ("released", "ours", "hf")  # hf: transformers' class with VisionZip (packed positions only)
# POPE's question, the instruction CDPruner's relevance reads (one per row; the other methods read none).
BENCH_INSTRUCTION = "Is there a dog in the image? Answer the question using a single word or phrase."


@dataclass(frozen=True)
class Case:
    """One row of the table: a path at a budget (visual tokens per image; the full count for vanilla).

    A method that prunes inside the language model is a path of its own name (``fastv``, ``pdrop``, ``sparsevlm``)
    with its config in ``pruning`` and ``reading``, how its budget was read (:mod:`llava.bench.methods`); an
    encoder-side selection (``divprune``, ``vispruner``, ``cdpruner``) one with its config in ``selection``
    (:mod:`llava.bench.selection`). ``quant``: the weights in 8 or 4 bits (:mod:`llava.bench.quant`), None: as built.
    """

    path: str
    budget: int
    visionzip: VisionZipConfig | None  # per view; None for vanilla and the other methods
    pruning: PruneConfig | None = None
    reading: str | None = None  # "average" (layer-average) or "kept" (after the first cut); in-LLM methods only
    selection: SelectionConfig | None = None  # tokens per view
    quant: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path}@{self.budget}" + (f"/{self.quant}" if self.quant else "")


def make_cases(
    shape: LlavaShape, budgets: list[int], positions: str = "packed", paths: tuple[str, ...] = ("released", "ours")
) -> list[Case]:  # fmt: skip
    """Vanilla, then each of ``paths`` (of :data:`VISIONZIP_PATHS`) at each budget below the full count
    (VisionZip's ``positions``: the kept tokens' position ids, which change no cost)."""
    unknown = sorted(set(paths) - set(VISIONZIP_PATHS))
    if unknown:
        raise ValueError(f"unknown paths {unknown}: expected some of {VISIONZIP_PATHS}")
    if "hf" in paths and positions != "packed":
        raise ValueError(f"the hf path (transformers' classes) places kept tokens packed, not {positions!r}")
    cases = [Case("vanilla", shape.full_budget, None)]
    for budget in budgets:
        if budget >= shape.full_budget:
            raise ValueError(f"budget {budget} is not below {shape.name}'s {shape.full_budget} visual tokens")
        cfg = dataclasses.replace(view_config(shape, budget), positions=positions)
        cases += [Case(path, budget, cfg) for path in VISIONZIP_PATHS if path in paths]
    return cases


@dataclass
class Request:
    """Identical requests: ``input_ids`` (B, T + 1) with one image placeholder, ``images`` (B, [V,] 3, H, W)."""

    input_ids: torch.Tensor
    images: torch.Tensor
    image_sizes: list[tuple[int, int]] | None
    decode_tokens: int
    instructions: list[str] | None = None  # one per row: CDPruner's relevance reads it


def make_request(
    shape: LlavaShape, batch: int, text_tokens: int, decode_tokens: int, device: torch.device, dtype: torch.dtype
) -> Request:
    """Random text ids and pixels (values do not change the time); the image after the first half of the text."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(FIRST_TEXT_ID, shape.language.vocab, (batch, text_tokens), generator=generator)
    at = text_tokens // 2  # where the image sits does not change any cost
    placeholder = torch.full((batch, 1), IMAGE_TOKEN_INDEX)
    input_ids = torch.cat([ids[:, :at], placeholder, ids[:, at:]], dim=1).to(device)  # (B, T + 1)
    side = shape.vision.image_size
    pixels = torch.randn(batch, shape.views, 3, side, side, generator=generator).to(device=device, dtype=dtype)
    sizes = [shape.image_hw] * batch if shape.anyres_grid is not None else None
    images = pixels if shape.anyres_grid is not None else pixels[:, 0]
    return Request(input_ids, images, sizes, decode_tokens, [BENCH_INSTRUCTION] * batch)


# Host clocks: wall time, or this process's CPU time, steadier on a shared CPU host (other processes' load does not
# count; with one thread it is the work done, with more it sums them)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class StageClock:
    """Marks between stages: CUDA events on GPU (no synchronisation in between), a host clock otherwise."""

    def __init__(self, device: torch.device, clock: str = "wall") -> None:
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
        if clock == "cpu" and device.type != "cpu":
            raise ValueError(
                f"the cpu clock times CPU runs only (a GPU's work is not this process's time), got {device}"
            )
        self.cuda = device.type == "cuda"
        self.now = CLOCKS[clock]
        self.marks: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, self.now()))

    def durations_ms(self) -> dict[str, float]:
        """Milliseconds of each stage, from the previous mark to its own."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, start), (name, end) in zip(self.marks, self.marks[1:], strict=False):
            out[name] = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
        return out


@contextmanager
def projector_marks(bench: BenchModel, clock: StageClock) -> Iterator[None]:
    """Mark "encoder" when the projector starts and "projector" when it returns; hooks removed on exit."""
    projector = bench.model.get_model().mm_projector
    handles = [
        projector.register_forward_pre_hook(lambda *_: clock.mark("encoder")),
        projector.register_forward_hook(lambda *_: clock.mark("projector")),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class CaseRun:
    """What one request of a case gave: stage milliseconds, LLM sequence length, KV-cache bytes after prefill, the
    first token (B, 1) and, with an in-LLM method, the visual tokens each decoder layer took in (the most of any row:
    the rows are padded to it)."""

    ms: dict[str, float]
    seq_len: int
    kv_bytes: int
    first_token: torch.Tensor
    visual_counts: list[int] | None = None


def set_method(model: Any, case: Case) -> Any:
    """``model`` with ``case``'s method on and the others off (one method at a time: each refuses beside another)."""
    model.set_selection(None)
    model.set_visionzip(None)
    model.set_pruning(None)
    model.set_visionzip(case.visionzip)
    model.set_pruning(case.pruning)
    model.set_selection(case.selection)
    return model


def cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers ``DynamicCache`` (keys and values of every layer)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def run_request(bench: BenchModel, case: Case, request: Request, clock: StageClock) -> CaseRun:
    """Image -> tower -> (VisionZip) -> projector -> input -> LLM prefill (first token) -> greedy decoding.

    The model's own input step (``multimodal_batch``, what ``prepare_inputs_labels_for_multimodal`` runs) and
    forward run, as in ``generate``; no padding (every sample has the same length), so no attention mask. Position
    ids are passed only with VisionZip's ``positions="original"`` (decoding continues after the last one); otherwise
    the LLM numbers the tokens itself. An in-LLM method gets the tokens' ``image_ids`` as ``generate`` passes them.
    The ``hf`` path runs transformers' class instead (:func:`run_hf_request`). The stage "encoder" ends where the
    projector starts: a selection that reads projected tokens (DivPrune, CDPruner) chooses after it, in "input".
    """
    if case.path == "hf":
        return run_hf_request(bench, case, request, clock)
    model = set_method(bench.model, case)
    tower = bench.released_tower if case.path == "released" else bench.tower
    with use_tower(bench, tower):
        clock.mark("start")
        with projector_marks(bench, clock):
            batch = model.multimodal_batch(
                request.input_ids, None, None, request.images, request.image_sizes, instructions=request.instructions
            )  # fmt: skip
        embeds, positions = batch.inputs_embeds, batch.position_ids  # (B, L, D), (B, L)
        if case.visionzip is None or case.visionzip.positions == "packed":
            positions = None
        clock.mark("input")
        out = model(
            inputs_embeds=embeds, position_ids=positions, use_cache=True, logits_to_keep=1,
            **model.pruning_inputs(batch.image_ids),
        )  # fmt: skip
        token = first = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        clock.mark("prefill")
        cache = out.past_key_values
        kv_bytes = cache_bytes(cache)
        for _ in range(request.decode_tokens):
            positions = None if positions is None else positions[:, -1:] + 1  # (B, 1)
            out = model(
                input_ids=token, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1
            )
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        clock.mark("decode")
    counts = None
    if case.pruning is not None:
        counts = model.get_model().visual_counts.max(dim=0).values.tolist()  # (L,) of the padded rows
    return CaseRun(clock.durations_ms(), embeds.shape[1], kv_bytes, first, counts)


@contextmanager
def hf_marks(model: Any, clock: StageClock) -> Iterator[None]:
    """The stage marks of transformers' class: "encoder" and "projector" around its projector, "input" when its
    language model starts (the image features are in place); hooks removed on exit."""
    inner = model.model
    handles = [
        inner.multi_modal_projector.register_forward_pre_hook(lambda *_: clock.mark("encoder")),
        inner.multi_modal_projector.register_forward_hook(lambda *_: clock.mark("projector")),
        inner.language_model.register_forward_pre_hook(lambda *_: clock.mark("input")),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_hf_request(bench: BenchModel, case: Case, request: Request, clock: StageClock) -> CaseRun:
    """The request through transformers' VisionZip class (``bench.hf``, the same weights): one forward from ids and
    pixels to the first token (its ``get_image_features`` compresses, the placeholders hold the compressed count),
    then greedy decoding on its cache."""
    model = bench.hf
    if model is None:
        raise ValueError("the hf path needs the transformers model: build_model(..., hf=True)")
    model.set_visionzip(case.visionzip)
    count = visual_tokens(bench.shape, case.visionzip)
    input_ids = hf_inputs(request.input_ids, IMAGE_TOKEN_INDEX, model.config.image_token_id, count)  # (B, L)
    images = hf_image_kwargs(request.images, request.image_sizes)
    clock.mark("start")
    with hf_marks(model, clock):
        out = model(input_ids=input_ids, **images, use_cache=True, logits_to_keep=1)
    token = first = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
    clock.mark("prefill")
    cache = out.past_key_values
    kv_bytes = cache_bytes(cache)
    for _ in range(request.decode_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    clock.mark("decode")
    return CaseRun(clock.durations_ms(), input_ids.shape[1], kv_bytes, first)


def measure_times(
    bench: BenchModel, cases: list[Case], request: Request, warmup: int, repeat: int, device: torch.device,
    clock: str = "wall",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Median stage times per case by ``clock`` (:data:`CLOCKS`); rounds interleave the cases (rotated each round) so
    drift hits all alike.

    Returns: case label -> {"ms": {stage: median}, "first_token_ms": median of the per-round sums,
    "first_token_ms_rounds": every round's sum (the spread), "seq_len", "kv_bytes"}.
    """
    samples: dict[str, list[CaseRun]] = {case.label: [] for case in cases}
    rounds = tqdm(range(warmup + repeat), desc=bench.shape.name, unit="round")
    for round_index in rounds:
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            run = run_request(bench, case, request, StageClock(device, clock))
            if round_index >= warmup:
                samples[case.label].append(run)
    result = {}
    for label, runs in samples.items():
        ms = {stage: statistics.median(run.ms[stage] for run in runs) for stage in STAGES}
        first = [sum(run.ms[s] for s in FIRST_TOKEN_STAGES) for run in runs]
        result[label] = {
            "ms": ms, "first_token_ms": statistics.median(first), "first_token_ms_rounds": first,
            "seq_len": runs[0].seq_len, "kv_bytes": runs[0].kv_bytes, "visual_counts": runs[0].visual_counts,
        }  # fmt: skip
    return result


def request_memory(bench: BenchModel, case: Case, request: Request, device: torch.device) -> dict[str, float]:
    """Extra MiB one request allocates above the weights (:func:`visionzip.bench.measure_memory`): ``peak_extra_mib``
    (tensors created by ops alive at peak, any device) and, on CUDA, ``cuda_peak_extra_mib``."""
    memory = measure_memory(lambda _: run_request(bench, case, request, StageClock(device)), None, device)
    memory["peak_extra_mib"] = memory.pop("extra_mib")
    return memory
