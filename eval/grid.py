"""Run a table's (or sweep's) grid through lmms-eval, one run per (row, task), skipping cells already done.

Each cell writes lmms-eval's output (results, samples) and a log under ``<out>/<row id>/<task>/``; a task counts as
done once a results file under ``<out>/<row id>`` holds it (lmms-eval writes it only at the end of a run), so a
crashed or interrupted grid resumes where it stopped. ``python -m eval.tables`` reads the same folders.

``--in-process`` evaluates every cell in this process instead: lmms-eval is imported and its tasks indexed once
(each subprocess spends about 20 s on that on a 2-core machine), each cell's model is made, evaluated and freed in turn,
and its results and samples are saved as the CLI saves them. One process, one device: no ``--launcher``.

Usage::

    python -m eval.grid --table 1 --out playground/eval/table1 [--pretrained /ckpt/llava-v1.5-7b] [--dry-run]
    python -m eval.grid --spec configs/eval/sweep.yaml --out playground/eval/sweep \
        --launcher "accelerate launch --num_processes 8 -m lmms_eval" --batch-size 8
    python -m eval.grid --spec mini.yaml --out playground/eval/mini --in-process --model-arg device=cpu
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from eval.hf_runner import check_hf_options
from eval.options import ModelOptions
from eval.plugin import EXTRA_OPTIONS, MODEL_NAME, SELECTION_MODELS
from eval.tables.results import folder_results, results_files
from eval.tables.spec import Row, TableSpec, load_spec, resolve_spec_path
from eval.visual_tokens import REPORT_ENV, REPORT_FILE, RESULTS_KEY, add_to_results_file

logger = logging.getLogger(__name__)

DEFAULT_LAUNCHER = f"{shlex.quote(sys.executable)} -m lmms_eval"


@dataclass(frozen=True)
class Cell:
    """One lmms-eval run: a row's model args on its tasks (one, or all of the row's with ``group``), in ``folder``;
    ``model`` is the lmms-eval model name (the spec's ``lmms_model``)."""

    row: Row
    tasks: tuple[str, ...]
    folder: Path
    model_args: str
    model: str

    @property
    def task(self) -> str:
        """lmms-eval's ``--tasks`` value."""
        return ",".join(self.tasks)


def model_args_string(spec: TableSpec, row: Row, overrides: dict[str, Any]) -> str | None:
    """``pretrained=P,conv_template=vicuna_v1,budget=64`` for a row, validated; None for an unset optional row."""
    row_args = row.resolved_model_args()
    if row_args is None:
        if row.optional:
            return None
        raise ValueError(f"row {row.id}: model args {row.model_args} name an unset environment variable")
    args: dict[str, Any] = {**spec.model, **row_args, **overrides}
    args = {k: "/".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in args.items()}  # [2, 8] -> 2/8
    if row.pretrained is not None:
        pretrained = row.resolved_pretrained()
        if pretrained is None:
            if row.optional:
                return None
            raise ValueError(f"row {row.id}: pretrained {row.pretrained!r} names an unset environment variable")
        args["pretrained"] = pretrained
    common = args
    if spec.lmms_model in EXTRA_OPTIONS:  # the model's own args (e.g. Qwen's retention): checked, then set aside
        module, name = EXTRA_OPTIONS[spec.lmms_model].rsplit(".", 1)
        _, common = getattr(importlib.import_module(module), name).split_kwargs(args)
    options = ModelOptions.from_kwargs(**common)  # fail before launching anything
    if spec.lmms_model != MODEL_NAME:  # transformers' classes: not every option of our LLaVA applies
        options.refuse_llm_method(spec.lmms_model, selections=spec.lmms_model in SELECTION_MODELS)
        check_hf_options(options, spec.lmms_model)
    text = {k: "" if v is None else str(v) for k, v in args.items()}
    bad = [k for k, v in text.items() if "," in v or "=" in v]
    if bad:
        raise ValueError(f"row {row.id}: model args {bad} contain ',' or '=', which lmms-eval cannot parse")
    return ",".join(f"{k}={v}" for k, v in text.items() if v != "")


def plan(
    spec: TableSpec, out: Path, overrides: dict[str, Any], rows: Sequence[str] = (), tasks: Sequence[str] = (),
    group: bool = False,
) -> list[Cell]:  # fmt: skip
    """The cells not done yet (``rows``/``tasks`` filter by row id and task name; empty keeps all).

    A task is done once a results file anywhere under ``<out>/<row id>`` holds it. ``group`` puts a row's remaining
    tasks in one run (the model loads once; a crash loses the whole run).
    """
    unknown = sorted(set(rows) - {r.id for r in spec.rows}) + sorted(set(tasks) - set(spec.tasks))
    if unknown:
        raise ValueError(f"unknown rows or tasks {unknown}; rows: {[r.id for r in spec.rows]}, tasks: {spec.tasks}")
    cells = []
    for row in spec.rows:
        if rows and row.id not in rows:
            continue
        args = model_args_string(spec, row, overrides)
        if args is None:
            logger.info("skipping %s: its checkpoint (%s) or model args (%s) are not set", row.id, row.pretrained,
                        row.model_args)  # fmt: skip
            continue
        finished = folder_results(out / row.id)
        todo = [t for t in spec.tasks if (not tasks or t in tasks) and t not in finished]
        if group and todo:
            cells.append(Cell(row, tuple(todo), out / row.id / "+".join(todo), args, spec.lmms_model))
        else:
            cells += [Cell(row, (t,), out / row.id / t, args, spec.lmms_model) for t in todo]
    return cells


def lmms_eval_command(
    cell: Cell, launcher: str, batch_size: int, include_path: Path | None, limit: float | None
) -> list[str]:
    """The lmms-eval command line of one cell."""
    command = [*shlex.split(launcher), "--model", cell.model, "--model_args", cell.model_args, "--tasks", cell.task]
    command += ["--batch_size", str(batch_size), "--output_path", str(cell.folder), "--log_samples"]
    if include_path is not None:
        command += ["--include_path", str(include_path)]
    if limit is not None:
        command += ["--limit", str(limit)]
    return command


def run_cell(cell: Cell, command: Sequence[str]) -> bool:
    """Run one cell, its output in ``<folder>/lmms_eval.log``; True when its results file holds its tasks.

    lmms-eval's CLI exits 0 even when a task fails, so success is read from the results file.
    """
    cell.folder.mkdir(parents=True, exist_ok=True)
    logger.info("running %s / %s", cell.row.id, cell.task)
    report = cell.folder / REPORT_FILE  # the plugin's achieved visual tokens (in-LLM methods), for the results file
    report.unlink(missing_ok=True)
    with open(cell.folder / "lmms_eval.log", "a") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        env = {**os.environ, REPORT_ENV: str(report)}
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    ok = set(cell.tasks) <= set(folder_results(cell.folder))
    if ok and report.is_file():
        add_to_results_file(results_files(cell.folder)[-1], json.loads(report.read_text()))
    if not ok:
        logger.error("%s / %s failed (exit %d): see %s", cell.row.id, cell.task, code, cell.folder / "lmms_eval.log")
    return ok


def include_path_of(spec: TableSpec, extra: Sequence[Path]) -> Path | None:
    """The one task folder lmms-eval's CLI accepts (the spec's or the command line's)."""
    paths = list(dict.fromkeys([*spec.include_paths, *extra]))
    if len(paths) > 1:
        raise ValueError(f"lmms-eval's CLI takes one --include_path; this run names {[str(p) for p in paths]}")
    return paths[0] if paths else None


def lmms_eval_task_manager(include_path: Path | None, model_name: str) -> Any:
    """lmms-eval's ``TaskManager`` as its CLI builds it (the model's name, the one include path).

    Building it indexes every lmms-eval task (seconds), so an in-process grid builds one and shares it. Everything
    the cells use of lmms-eval is imported here, first: importing ``lmms_eval.models`` replaces every loguru sink,
    which would drop the first cell's log file.
    """
    try:
        import lmms_eval.evaluator
        import lmms_eval.loggers
        import lmms_eval.models  # noqa: F401  (the imports above and this one: see the docstring)
        from lmms_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("--in-process runs lmms-eval in this process: pip install -e '.[eval]'") from err
    return TaskManager("INFO", include_path=None if include_path is None else str(include_path), model_name=model_name)


def evaluate_in_process(cell: Cell, task_manager: Any, batch_size: int, limit: float | None) -> None:
    """Evaluate one cell with lmms-eval's ``simple_evaluate`` and save its output as the CLI saves it.

    The model is made from the cell's model args through lmms-eval's registry (as ``--model <cell.model>``);
    results go to ``<folder>/<model name>/<date>_results.json`` and samples to ``<date>_samples_<task>.jsonl``.
    Raises whatever making the model or evaluating raises.
    """
    from lmms_eval import evaluator, utils
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.models import get_model

    missing = [t for t in cell.tasks if t not in task_manager.match_tasks(list(cell.tasks))]
    if missing:
        raise ValueError(f"lmms-eval found no task {missing}: expected it in lmms-eval or the --include-path folder")
    tracker = EvaluationTracker(output_path=str(cell.folder))  # before the model loads: its clock times the run
    datetime_str = utils.get_datetime_str()  # the CLI's default timezone
    # the CLI hands lmms-eval --batch_size and --limit as str and float: the same values land in the results file
    batch, limit = str(batch_size), None if limit is None else float(limit)
    model = get_model(cell.model).create_from_arg_string(cell.model_args, {"batch_size": batch})
    results = evaluator.simple_evaluate(
        model=model, model_args=cell.model_args, tasks=list(cell.tasks), batch_size=batch, limit=limit,
        log_samples=True, evaluation_tracker=tracker, task_manager=task_manager, datetime_str=datetime_str,
        gen_kwargs="",  # the CLI's default, recorded in the results file
    )  # fmt: skip
    tally = model.visual_tokens() if hasattr(model, "visual_tokens") else None
    del model
    if results is None:
        raise RuntimeError(f"lmms-eval returned no results for {cell.row.id} / {cell.task}")
    if tally is not None:  # an in-LLM method: what it achieved beside its nominal budget, as the CLI runs record it
        results["config"][RESULTS_KEY] = tally.summary()
    samples = results.pop("samples")
    # simple_evaluate names a model instance by its class: record the registry name, as the CLI's run does
    results["config"]["model"] = cell.model
    tracker.general_config_tracker.log_experiment_args(
        model_source=cell.model, model_args=cell.model_args, system_instruction=None, chat_template=None,
        fewshot_as_multiturn=False,
    )  # fmt: skip
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=datetime_str)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])


@contextlib.contextmanager
def cell_log(path: Path, header: str) -> Iterator[None]:
    """Append lmms-eval's log (loguru) and Python logging's records to ``path`` while the block runs."""
    from loguru import logger as lmms_eval_logger  # lmms-eval's logger, installed with it

    with open(path, "a") as log:
        log.write(header + "\n")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    sink = lmms_eval_logger.add(str(path), level="INFO")
    try:
        yield
    finally:
        lmms_eval_logger.remove(sink)
        logging.getLogger().removeHandler(handler)
        handler.close()


def run_cell_in_process(cell: Cell, task_manager: Any, batch_size: int, limit: float | None, header: str) -> bool:
    """Evaluate one cell here, its log in ``<folder>/lmms_eval.log``; True when its results file holds its tasks.

    A cell that raises is logged with its traceback (there and here) and reported as failed; its model is freed
    either way, so the next cell starts with the memory this one held.
    """
    cell.folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with cell_log(cell.folder / "lmms_eval.log", header):
        try:
            evaluate_in_process(cell, task_manager, batch_size, limit)
        except Exception:  # one cell's failure (a missing checkpoint, a task error) must not stop the grid
            logger.exception("%s / %s raised", cell.row.id, cell.task)
    gc.collect()  # the model, and a traceback's frames that held it
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    ok = set(cell.tasks) <= set(folder_results(cell.folder))
    seconds = time.perf_counter() - start
    if ok:
        logger.info("%s / %s done in %.1f s", cell.row.id, cell.task, seconds)
    else:
        log = cell.folder / "lmms_eval.log"
        logger.error("%s / %s failed after %.1f s: see %s", cell.row.id, cell.task, seconds, log)
    return ok


def run_in_process(
    cells: Sequence[Cell], batch_size: int, include_path: Path | None, limit: float | None
) -> dict[str, list[Cell]]:
    """Evaluate the cells one after another in this process, sharing one task index; ``ran`` and ``failed``."""
    outcome: dict[str, list[Cell]] = {"ran": [], "failed": []}
    if not cells:
        return outcome  # nothing to do: do not spend seconds importing lmms-eval and indexing its tasks
    task_manager = lmms_eval_task_manager(include_path, cells[0].model)
    for cell in tqdm(cells, desc="grid cells (in-process)", unit="cell"):
        command = shlex.join(lmms_eval_command(cell, DEFAULT_LAUNCHER, batch_size, include_path, limit))
        header = f"# in process (python -m eval.grid --in-process), as\n$ {command}"
        ok = run_cell_in_process(cell, task_manager, batch_size, limit, header)
        outcome["ran" if ok else "failed"].append(cell)
    return outcome


def run_grid(
    spec: TableSpec, out: Path, launcher: str = DEFAULT_LAUNCHER, batch_size: int = 1,
    overrides: dict[str, Any] | None = None, rows: Sequence[str] = (), tasks: Sequence[str] = (),
    include_paths: Sequence[Path] = (), limit: float | None = None, dry_run: bool = False, group: bool = False,
    in_process: bool = False,
) -> dict[str, list[Cell]]:  # fmt: skip
    """Run every cell not done yet; the cells by outcome: ``ran``, ``failed`` or (``dry_run``) ``planned``.

    ``in_process`` evaluates them all in this process (:func:`run_in_process`) instead of one lmms-eval
    subprocess each; it takes no ``launcher``.
    """
    if in_process and launcher != DEFAULT_LAUNCHER:
        raise ValueError(f"in-process runs take no launcher (one process, one device); got launcher {launcher!r}")
    include = include_path_of(spec, include_paths)
    outcome: dict[str, list[Cell]] = {"ran": [], "failed": [], "planned": []}
    if limit is not None:
        logger.warning("--limit %s: a smoke run, not the benchmark; keep its --out apart from real results", limit)
    cells = plan(spec, out, overrides or {}, rows, tasks, group)
    if dry_run:
        for cell in cells:
            print(shlex.join(lmms_eval_command(cell, launcher, batch_size, include, limit)))
        outcome["planned"] = cells
    elif in_process:
        outcome |= run_in_process(cells, batch_size, include, limit)
    else:
        for cell in cells:
            command = lmms_eval_command(cell, launcher, batch_size, include, limit)
            outcome["ran" if run_cell(cell, command) else "failed"].append(cell)
    logger.info("grid %s: %s", spec.name, ", ".join(f"{k} {len(v)}" for k, v in outcome.items()))
    return outcome


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    """The runner's flags; ``--model-arg device=cpu`` (repeatable) overrides a spec's model args."""
    parser = argparse.ArgumentParser(prog="python -m eval.grid", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--table", help="1, 2, 10 (eval/tables/table<N>.yaml)")
    which.add_argument("--spec", "--sweep", dest="spec", type=Path, help="a table or sweep spec YAML")
    parser.add_argument("--out", type=Path, required=True, help="results folder, e.g. playground/eval/table1")
    parser.add_argument("--launcher", default=DEFAULT_LAUNCHER, help="e.g. 'accelerate launch -m lmms_eval'")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--pretrained", default=None, help="checkpoint for rows that do not name their own")
    parser.add_argument("--model-arg", type=_key_value, action="append", default=[], help="KEY=VALUE override")
    parser.add_argument("--rows", nargs="*", default=[], help="row ids to run (default: all)")
    parser.add_argument("--tasks", nargs="*", default=[], help="tasks to run (default: all)")
    parser.add_argument("--include-path", type=Path, action="append", default=[], help="an extra task folder")
    parser.add_argument("--limit", type=float, default=None, help="questions per task (smoke runs only)")
    parser.add_argument("--group", action="store_true", help="one lmms-eval run per row (all its tasks)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the cells not done")
    parser.add_argument(
        "--in-process", action="store_true", help="evaluate every cell in this process (lmms-eval imported once)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid; exit status 1 when a cell failed."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = load_spec(resolve_spec_path(args.table) if args.table else args.spec)
    overrides = dict(args.model_arg) | ({"pretrained": args.pretrained} if args.pretrained else {})
    outcome = run_grid(
        spec, args.out, args.launcher, args.batch_size, overrides, args.rows, args.tasks, args.include_path,
        args.limit, args.dry_run, args.group, args.in_process,
    )  # fmt: skip
    return 1 if outcome["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
