"""Render a reproduction table (or sweep) from lmms-eval results: Markdown on stdout, and .md, .csv, .png files.

Usage::

    python -m eval.tables --table 1 --results playground/eval/table1      # eval/tables/table1.yaml
    python -m eval.tables --spec configs/eval/sweep.yaml --results playground/eval/sweep
    python -m eval.tables --table 1                                        # the paper's numbers alone (a check)
    python -m eval.tables --spec eval/tables/multiturn.yaml --results playground/eval/multiturn  # + turn-2 drops
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from eval.tables.render import DEFAULT_TOLERANCE, build_table, markdown, plot, write_csv
from eval.tables.results import collect, collect_visual_tokens
from eval.tables.spec import load_spec, resolve_spec_path
from eval.tables.turns import turn_rows, turns_markdown

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """``--table N`` or ``--spec FILE`` (``--sweep`` is the same), ``--results``, ``--out``, ``--tolerance``."""
    parser = argparse.ArgumentParser(prog="python -m eval.tables", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--table", help="a table number (1, 2, 10) or name: eval/tables/table<N>.yaml")
    which.add_argument("--spec", "--sweep", dest="spec", type=Path, help="a table or sweep spec YAML")
    parser.add_argument("--results", type=Path, default=None, help="the grid runner's output folder")
    parser.add_argument("--out", type=Path, default=None, help="where to write <name>.md/.csv/.png (default: results)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="flag published Avg off by more")
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    """Render; print the Markdown and return it."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = load_spec(resolve_spec_path(args.table) if args.table else args.spec)
    ours = collect(spec, args.results) if args.results else {}
    if args.results and not ours:
        logger.warning("no lmms-eval results for %s under %s", spec.name, args.results)
    achieved = collect_visual_tokens(spec, args.results) if args.results else {}
    rows = build_table(spec, ours, args.tolerance, achieved)
    text = markdown(spec, rows)
    if spec.multiturn is not None:  # a multi-turn spec: the drop of each row at turn 2 against alone
        text += "\n" + turns_markdown(spec, turn_rows(spec, ours))
    out = args.out or args.results or Path("playground/eval") / spec.name
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{spec.name}.md").write_text(text)
    write_csv(spec, rows, out / f"{spec.name}.csv")
    plot(spec, rows, out / f"{spec.name}.png")
    logger.info("wrote %s/%s.{md,csv,png}", out, spec.name)
    print(text)
    return text


if __name__ == "__main__":
    main()
