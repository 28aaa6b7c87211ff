"""Reproduction tables: specs (rows x lmms-eval tasks), results reading, and rendering beside the paper's numbers."""

from eval.tables.render import TableRow, build_table, markdown, plot, read_paper, retention, write_csv
from eval.tables.results import collect, collect_visual_tokens, folder_results, read_results_file
from eval.tables.spec import Benchmark, Part, Row, TableSpec, load_spec, resolve_spec_path

__all__ = [
    "Benchmark",
    "Part",
    "Row",
    "TableRow",
    "TableSpec",
    "build_table",
    "collect",
    "collect_visual_tokens",
    "folder_results",
    "load_spec",
    "markdown",
    "plot",
    "read_paper",
    "read_results_file",
    "resolve_spec_path",
    "retention",
    "write_csv",
]
