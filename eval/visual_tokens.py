"""The visual tokens a run with an in-LLM method achieved (each request's layer-average, averaged over the run), or
that a selection (DivPrune, VisPruner, CDPruner) gave the language model (each request's count, averaged).

A method that prunes inside the language model (FastV, PDrop, SparseVLM) is asked for a nominal budget, a
layer-average of visual tokens; what it keeps depends on each image's token count (AnyRes) and, for SparseVLM, on
the question. After every prefill the model reports each row's layer-average in both counting conventions
(``model.get_model().pruning_report()``: over the tokens each decoder layer takes in, over those it puts out); a
:class:`VisualTokenTally` averages them over the requests with an image. The summary goes into the lmms-eval results
file (``results["config"]["visual_tokens"]``) and the log. A selection keeps the same tokens in every layer, so both
conventions give its count, which is measured as what the language model received: each row's real tokens in the
prefill less its text tokens (:func:`prefill_lengths`, :func:`visual_counts`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llava.constants import IMAGE_TOKEN_INDEX

logger = logging.getLogger(__name__)

RESULTS_KEY = "visual_tokens"  # results["config"][RESULTS_KEY] in lmms-eval's results file
REPORT_FILE = "visual_tokens.json"  # what an lmms-eval subprocess leaves in its output folder for eval.grid
REPORT_ENV = "LLAVA_VISIONZIP_VISUAL_TOKENS"  # where the plugin writes it (set by eval.grid for its subprocesses)
TALLY_KINDS = ("layer-average", "kept")  # an in-LLM method's layer-average; a selection's kept count


@dataclass
class VisualTokenTally:
    """Running sums of the achieved layer-averages of one run.

    Attributes:
        method: the method's name; config: its saved config (``to_dict()``).
        nominal: the budget asked for (a layer-average; a selection's tokens per view), or None where the method's
            options fix the count.
        multiturn: the multi-turn mode the run was given (single-turn tasks answer the same in both).
        requests: requests whose prompt held an image; without_image: those that held none (nothing to prune).
        inputs_sum, outputs_sum: sums over ``requests`` of the layer-average over layer inputs / outputs.
        kind: ``layer-average`` (an in-LLM method) or ``kept`` (a selection: the tokens per request, every layer).
    """

    method: str
    config: dict[str, Any]
    nominal: float | None
    multiturn: str
    requests: int = 0
    without_image: int = 0
    inputs_sum: float = 0.0
    outputs_sum: float = 0.0
    kind: str = "layer-average"

    def __post_init__(self) -> None:
        if self.kind not in TALLY_KINDS:
            raise ValueError(f"visual-token tally kind must be one of {TALLY_KINDS}, got {self.kind!r}")

    def add(self, report: Sequence[tuple[float, float] | None]) -> None:
        """One prefill's rows: (inputs, outputs) layer-averages, None for a row without an image."""
        for row in report:
            if row is None:
                self.without_image += 1
            else:
                self.requests += 1
                self.inputs_sum += row[0]
                self.outputs_sum += row[1]

    def merge(self, other: VisualTokenTally) -> None:
        """Add another process's sums (data-parallel runs)."""
        self.requests += other.requests
        self.without_image += other.without_image
        self.inputs_sum += other.inputs_sum
        self.outputs_sum += other.outputs_sum

    def summary(self) -> dict[str, Any]:
        """The numbers a results file records: nominal budget, achieved averages (None before any image)."""
        count = self.requests
        return {
            "method": self.method,
            "config": self.config,
            "nominal_budget": self.nominal,
            "multiturn": self.multiturn,
            "kind": self.kind,
            "requests": count,
            "requests_without_image": self.without_image,
            "layer_average_inputs": self.inputs_sum / count if count else None,
            "layer_average_outputs": self.outputs_sum / count if count else None,
        }

    def describe(self) -> str:
        """One log line: method, nominal budget, achieved averages in both conventions."""
        data = self.summary()
        nominal = "no nominal budget" if self.nominal is None else f"nominal {self.nominal:g}"
        if not self.requests:
            return f"{self.method} ({nominal}): no request with an image yet"
        if self.kind == "kept":
            return (
                f"{self.method}: {nominal} visual tokens per view kept; the language model received "
                f"{data['layer_average_inputs']:.1f} per request, mean of {self.requests} requests with an image "
                f"({self.without_image} without)"
            )
        return (
            f"{self.method}: {nominal} visual tokens (layer-average); achieved {data['layer_average_inputs']:.1f} "
            f"over layer inputs, {data['layer_average_outputs']:.1f} over layer outputs, mean of {self.requests} "
            f"requests with an image ({self.without_image} without)"
        )

    def to_json(self) -> dict[str, Any]:
        """Every field (for gathering across processes)."""
        return asdict(self)


@contextmanager
def prefill_lengths(language_model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, the (B,) real-token count of each row in every call to ``language_model`` (its attention
    mask's row sums; without a mask, the full length), first call (the prefill) first. A forward pre-hook, removed on
    leaving the block."""
    seen: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask, embeds = kwargs.get("attention_mask"), kwargs.get("inputs_embeds")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            seen.append(mask.sum(dim=1).cpu())
        elif embeds is not None:
            seen.append(torch.full((embeds.shape[0],), embeds.shape[1]))

    handle = language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def visual_counts(input_ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> list[int | None]:
    """The visual tokens of each row: its prefill's real tokens (``lengths`` (B,)) less its real text tokens in
    ``input_ids`` (B, L) under ``mask`` (B, L); None for a row without an image placeholder."""
    real = mask.bool()
    text = ((input_ids != IMAGE_TOKEN_INDEX) & real).sum(dim=1)  # (B,)
    has_image = ((input_ids == IMAGE_TOKEN_INDEX) & real).any(dim=1)  # (B,)
    return [
        int(n - t) if img else None
        for n, t, img in zip(lengths.tolist(), text.tolist(), has_image.tolist(), strict=True)
    ]


def write_report(path: str | Path, tally: VisualTokenTally) -> Path:
    """Write the tally's summary as JSON to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tally.summary(), indent=2))
    return path


def add_to_results_file(results_file: str | Path, summary: dict[str, Any]) -> None:
    """Record ``summary`` in an lmms-eval results file as ``config.visual_tokens``."""
    path = Path(results_file)
    data = json.loads(path.read_text())
    data.setdefault("config", {})[RESULTS_KEY] = summary
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
