"""Table specs: which model rows (method x visual tokens) run which lmms-eval tasks, read from YAML.

A table spec (``eval/tables/table1.yaml``) names the lmms-eval model (``lmms_model``, default ``llava_visionzip``),
the shared model args, the rows, the benchmark columns (each an lmms-eval task and metric, or several combined) and
the paper's CSV, and figures published elsewhere (``published``: a method's Avg retention in another paper's harness,
with its source). A sweep spec (``configs/eval/sweep.yaml``) gives a ``grid`` instead of rows; it expands to one row
per combination plus the baseline (:func:`expand_grid`: VisionZip splits, budgets, methods and their options).
Paths in a spec are relative to its file.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eval.plugin import MODEL_NAME, MODELS
from visionzip.methods import DEFAULT_BUDGET, LLM_METHODS, SELECTION_METHODS

TABLES_DIR = Path(__file__).resolve().parent
COMBINE_MODES = ("mean", "sum")
# a sweep's rows are labelled by method as the paper's tables name them
METHOD_LABELS = {
    "visionzip": "VisionZip", "fastv": "FastV", "pdrop": "PDrop", "sparsevlm": "SparseVLM", "divprune": "DivPrune",
    "vispruner": "VisPruner", "cdpruner": "CDPruner",
}  # fmt: skip
OPTION_METHODS = LLM_METHODS + SELECTION_METHODS  # methods whose options are model args <method>_<option>
_UNRESOLVED = re.compile(r"\$\{?\w+\}?")


@dataclass(frozen=True)
class Part:
    """One number an lmms-eval run reports: ``results[task][metric + ",none"]``."""

    task: str
    metric: str


@dataclass(frozen=True)
class Benchmark:
    """A column: its parts combined (``mean`` or ``sum``), times ``scale`` (0-1 fractions -> %).

    ``split`` is the lmms-eval task's split, ``paper_split`` the paper's; ``note`` says where they differ.
    """

    column: str
    parts: tuple[Part, ...]
    combine: str = "mean"
    scale: float = 1.0
    split: str = ""
    paper_split: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"benchmark {self.column}: needs task+metric or parts")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"benchmark {self.column}: combine must be one of {COMBINE_MODES}, got {self.combine!r}")

    @property
    def tasks(self) -> tuple[str, ...]:
        """The lmms-eval tasks to run for this column, in order, without repeats."""
        return tuple(dict.fromkeys(p.task for p in self.parts))

    def value(self, results: dict[str, dict[str, float]]) -> float | None:
        """The column's number from ``{task: {metric: value}}``; None unless every part is there."""
        values = [results.get(p.task, {}).get(p.metric) for p in self.parts]
        if any(v is None for v in values):
            return None
        total = sum(float(v) for v in values)  # type: ignore[arg-type]
        return self.scale * (total if self.combine == "sum" else total / len(values))


@dataclass(frozen=True)
class Published:
    """A figure published outside the paper's CSV: ``method``'s Avg retention (%) at ``tokens``, measured in
    ``harness`` (whose benchmarks and vanilla row may differ from the table's), as ``source`` says."""

    method: str
    tokens: int
    avg: float
    harness: str
    source: str

    def __post_init__(self) -> None:
        if not self.source.strip() or not self.harness.strip():
            raise ValueError(f"published figure {self.method} at {self.tokens}: needs its harness and source")
        if not 0 < self.avg <= 100:
            raise ValueError(f"published figure {self.method} at {self.tokens}: Avg is a % in (0, 100], got {self.avg}")


@dataclass(frozen=True)
class Row:
    """A model setting: ``method`` at ``tokens`` visual tokens, with its own model args (``budget=64``...).

    ``pretrained`` overrides the table's checkpoint; it and text model args may read ``${VAR}`` from the environment.
    An ``optional`` row whose checkpoint or args name an unset variable is skipped (e.g. VisionZip‡, which needs a
    fine-tuned projector; SparseVLM on LLaVA-NeXT, whose scale is calibrated first).
    """

    method: str
    tokens: int
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    optional: bool = False

    @property
    def id(self) -> str:
        """Folder name of the row's results: ``visionzip-64``."""
        return f"{slug(self.method)}-{self.tokens}"

    def resolved_pretrained(self) -> str | None:
        """``pretrained`` with environment variables expanded; None if one is unset."""
        if self.pretrained is None:
            return None
        value = os.path.expandvars(self.pretrained)
        return None if _UNRESOLVED.search(value) or not value else value

    def resolved_model_args(self) -> dict[str, Any] | None:
        """``model_args`` with environment variables expanded in text values; None if one is unset."""
        args = {k: os.path.expandvars(v) if isinstance(v, str) else v for k, v in self.model_args.items()}
        unset = [k for k, v in args.items() if isinstance(v, str) and (_UNRESOLVED.search(v) or not v)]
        return None if unset else args


@dataclass(frozen=True)
class TableSpec:
    """A reproduction table (or sweep): rows x benchmark columns, the baseline row, the paper's CSV; its rows run as
    lmms-eval model ``lmms_model`` (one of ``eval.plugin.MODELS``)."""

    name: str
    title: str
    model: dict[str, Any]
    rows: tuple[Row, ...]
    benchmarks: tuple[Benchmark, ...]
    baseline: tuple[str, int]
    paper: Path | None = None
    include_paths: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()
    lmms_model: str = MODEL_NAME
    published: tuple[Published, ...] = ()
    multiturn: tuple[str, str] | None = None  # (turn-2 column, alone column): eval.tables.turns' drop table

    def __post_init__(self) -> None:
        if self.lmms_model not in MODELS:
            raise ValueError(f"spec {self.name}: lmms_model must be one of {sorted(MODELS)}, got {self.lmms_model!r}")
        ids = [r.id for r in self.rows]
        if len(set(ids)) != len(ids):
            raise ValueError(f"spec {self.name}: two rows share a results folder: {ids}")
        if (self.baseline[0], self.baseline[1]) not in {(r.method, r.tokens) for r in self.rows}:
            raise ValueError(f"spec {self.name}: baseline {self.baseline} is not one of its rows")

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every lmms-eval task of the table, in column order."""
        return tuple(dict.fromkeys(t for b in self.benchmarks for t in b.tasks))

    def row(self, method: str, tokens: int) -> Row | None:
        """The row of ``method`` at ``tokens``, if the spec has one."""
        return next((r for r in self.rows if r.method == method and r.tokens == tokens), None)


def slug(text: str) -> str:
    """Lower-case letters, digits and dashes: ``"VisionZip‡ 54+10"`` -> ``"visionzip-54-10"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "row"


def _benchmark(data: dict[str, Any]) -> Benchmark:
    parts = data.get("parts") or [{"task": data.get("task"), "metric": data.get("metric")}]
    parts = tuple(Part(str(p["task"]), str(p["metric"])) for p in parts if p.get("task") and p.get("metric"))
    keys = ("combine", "scale", "split", "paper_split", "note")
    return Benchmark(str(data["column"]), parts, **{k: data[k] for k in keys if k in data})


def _benchmarks(data: Any, base: Path) -> tuple[Benchmark, ...]:
    """A list of benchmark mappings or ``{from: table1, column: GQA}`` references to another spec's columns;
    ``{from: table1, columns: [...]}`` (or without ``columns``: all of them) stands for the whole list."""
    if isinstance(data, dict):
        data = [{"from": data["from"], "column": c} for c in data.get("columns") or _columns(data["from"], base)]
    return tuple(_referenced(b, base) if "from" in b else _benchmark(b) for b in data)


def _columns(name: str, base: Path) -> list[str]:
    return [b.column for b in load_spec(resolve_spec_path(str(name), base)).benchmarks]


def _referenced(data: dict[str, Any], base: Path) -> Benchmark:
    source = load_spec(resolve_spec_path(str(data["from"]), base))
    found = [b for b in source.benchmarks if b.column == data["column"]]
    if not found:
        columns = [b.column for b in source.benchmarks]
        raise ValueError(f"column {data['column']!r} is not in {data['from']} ({columns})")
    return found[0]


def _row(data: dict[str, Any]) -> Row:
    return Row(
        str(data["method"]), int(data["tokens"]), dict(data.get("model_args") or {}), data.get("pretrained"),
        bool(data.get("optional", False)),
    )  # fmt: skip


def expand_grid(grid: dict[str, list[Any]], method: str = "VisionZip") -> list[Row]:
    """One row per combination of a sweep's ``grid`` (model args of ``llava_visionzip``), labelled ``method``.

    ``split: [[54, 10], ...]`` sets dominant and contextual; ``budget: [64, 128]`` a budget (VisionZip's split, or an
    in-LLM method's layer-average); ``method: [visionzip, fastv, pdrop]`` the method, which then labels the rows.
    A method's options (``fastv_layer: [2, 3]``) go only into that method's rows; combinations that differ only in
    another method's options are one row.
    """
    keys = list(grid)
    rows: dict[str, Row] = {}
    for values in itertools.product(*(grid[k] for k in keys)):
        args: dict[str, Any] = {}
        for key, value in zip(keys, values, strict=True):
            if key == "split":
                args["dominant"], args["contextual"] = (int(v) for v in value)
            else:
                args[key] = value
        named = args.get("method")
        args = {k: v for k, v in args.items() if k.partition("_")[0] not in OPTION_METHODS or k.startswith(f"{named}_")}
        if "dominant" not in args and "budget" not in args and named is None:
            raise ValueError("a sweep grid needs split: [[dominant, contextual], ...], budget: [...] or method: [...]")
        row = _grid_row(args, METHOD_LABELS.get(str(named), method) if named else method)
        rows.setdefault(row.id, row)
    return list(rows.values())


def _grid_row(args: dict[str, Any], label: str) -> Row:
    """A sweep row: ``<label> <dominant>+<contextual> | <budget> <other args>``; its tokens: the counts' sum, the
    budget, or an in-LLM method's default budget."""
    if "dominant" in args:
        counts, tokens = f"{args['dominant']}+{args['contextual']}", int(args["dominant"]) + int(args["contextual"])
    else:
        tokens = int(args.get("budget", DEFAULT_BUDGET))
        counts = str(tokens)
    extra = " ".join(f"{k}={v}" for k, v in args.items() if k not in ("dominant", "contextual", "budget", "method"))
    return Row(f"{label} {counts}" + (f" {extra}" if extra else ""), tokens, args)


def resolve_spec_path(name: str, base: Path = TABLES_DIR) -> Path:
    """``"1"``/``"table1"`` -> ``eval/tables/table1.yaml``; other names are paths (relative to ``base``)."""
    if re.fullmatch(r"\d+", name):
        return TABLES_DIR / f"table{name}.yaml"
    if re.fullmatch(r"table\d+", name):
        return TABLES_DIR / f"{name}.yaml"
    path = Path(name)
    return path if path.is_absolute() or path.exists() else base / path


def load_spec(path: str | Path) -> TableSpec:
    """Read a table or sweep spec."""
    path = Path(path).resolve()
    data = yaml.safe_load(path.read_text())
    base = path.parent
    rows = [_row(r) for r in data.get("rows") or []]
    if "grid" in data:
        rows += expand_grid(data["grid"], data.get("method", "VisionZip"))
    baseline = data["baseline"]
    if not any(r.method == baseline["method"] and r.tokens == int(baseline["tokens"]) for r in rows):
        rows.insert(0, Row(str(baseline["method"]), int(baseline["tokens"])))
    paper = (base / data["paper"]).resolve() if data.get("paper") else None
    benchmarks = _benchmarks(data["benchmarks"], base)
    return TableSpec(
        name=str(data.get("name", path.stem)), title=str(data.get("title", path.stem)),
        model=dict(data.get("model") or {}), rows=tuple(rows), benchmarks=benchmarks,
        baseline=(str(baseline["method"]), int(baseline["tokens"])), paper=paper,
        include_paths=tuple((base / p).resolve() for p in data.get("include_paths") or []),
        notes=tuple(data.get("notes") or []), lmms_model=str(data.get("lmms_model", MODEL_NAME)),
        published=tuple(_published(p) for p in data.get("published") or []),
        multiturn=_turn_columns(data.get("multiturn"), [b.column for b in benchmarks]),
    )  # fmt: skip


def _turn_columns(data: dict[str, str] | None, columns: list[str]) -> tuple[str, str] | None:
    """``multiturn: {turn2: A, alone: B}`` -> (A, B), both among the spec's columns."""
    if data is None:
        return None
    pair = (str(data.get("turn2")), str(data.get("alone")))
    if any(name not in columns for name in pair):
        raise ValueError(f"multiturn: {{turn2, alone}} must name two of the columns {columns}, got {data!r}")
    return pair


def _published(data: dict[str, Any]) -> Published:
    keys = ("method", "tokens", "avg", "harness", "source")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"a published figure needs {list(keys)}; {data!r} lacks {missing}")
    return Published(
        str(data["method"]), int(data["tokens"]), float(data["avg"]), str(data["harness"]), str(data["source"])
    )
