"""The size habits of STYLE.md, held by a test: no function over 60 lines, no file over 450 lines of code."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("eval", "llava", "visionzip")
MAX_FUNCTION_LINES = 60
MAX_FILE_CODE_LINES = 450


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def code_lines(text: str) -> int:
    """Lines that are neither blank nor comments (docstrings count: they are read as code is)."""
    return sum(1 for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))


def test_code_lines_counts_what_it_says() -> None:
    assert code_lines('"""doc."""\n\n# a comment\nx = 1  # trailing\n    \ny = 2\n') == 3


def test_no_function_over_the_limit() -> None:
    long = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_no_file_over_the_limit() -> None:
    big = [
        f"{path.relative_to(REPO)}: {n} lines of code"
        for path in source_files()
        if (n := code_lines(path.read_text())) > MAX_FILE_CODE_LINES
    ]
    assert not big, f"files over {MAX_FILE_CODE_LINES} lines of code:\n" + "\n".join(big)
