"""The visual tokens a run with an in-LLM method achieved: each request's layer-average, averaged over the run.

A method that prunes inside the language model (FastV, PDrop, SparseVLM) is asked for a nominal budget, a
layer-average of visual tokens; what it keeps depends on each image's token count (AnyRes) and, for SparseVLM, on
the question. After every prefill the model reports each row's layer-average in both counting conventions
(``model.get_model().pruning_report()``: over the tokens each decoder layer takes in, over those it puts out); a
:class:`VisualTokenTally` averages them over the requests with an image. The summary goes into the lmms-eval results
file (``results["config"]["visual_tokens"]``) and the log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS_KEY = "visual_tokens"  # results["config"][RESULTS_KEY] in lmms-eval's results file
REPORT_FILE = "visual_tokens.json"  # what an lmms-eval subprocess leaves in its output folder for eval.grid
REPORT_ENV = "LLAVA_VISIONZIP_VISUAL_TOKENS"  # where the plugin writes it (set by eval.grid for its subprocesses)


@dataclass
class VisualTokenTally:
    """Running sums of the achieved layer-averages of one run.

    Attributes:
        method: the in-LLM method's name; config: its saved config (``to_dict()``).
        nominal: the budget asked for (a layer-average), or None where the method's options fix the count.
        multiturn: the multi-turn mode the run was given (single-turn tasks answer the same in both).
        requests: requests whose prompt held an image; without_image: those that held none (nothing to prune).
        inputs_sum, outputs_sum: sums over ``requests`` of the layer-average over layer inputs / outputs.
    """

    method: str
    config: dict[str, Any]
    nominal: float | None
    multiturn: str
    requests: int = 0
    without_image: int = 0
    inputs_sum: float = 0.0
    outputs_sum: float = 0.0

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
        return (
            f"{self.method}: {nominal} visual tokens (layer-average); achieved {data['layer_average_inputs']:.1f} "
            f"over layer inputs, {data['layer_average_outputs']:.1f} over layer outputs, mean of {self.requests} "
            f"requests with an image ({self.without_image} without)"
        )

    def to_json(self) -> dict[str, Any]:
        """Every field (for gathering across processes)."""
        return asdict(self)


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
