"""The import graph of the non-test code points one way: eval/ -> llava/ -> visionzip/ (integrations -> core).

Read from the source with ``ast`` (every ``import`` and ``from ... import``, also inside functions, and every
``python -m MODULE`` a module runs as a subprocess), so a new arrow the wrong way fails here, naming the file and line.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("eval", "llava", "visionzip")
RANK = {"visionzip": 0, "llava": 1, "eval": 2}  # a module may use only its own rank and below
# The transformers integrations (visionzip.hf) use the core; the core never uses them.
INTEGRATIONS = ("visionzip.hf",)
# Library modules that also offer a thin ``python -m`` command over themselves (each with why it is imported).
LIBRARIES_WITH_A_COMMAND = {
    "eval.local_task": "writes local lmms-eval tasks; the video task and the miniature's preflight use its writers",
    "eval.multiturn": "the multi-turn task format and its chat answers; the lmms-eval plugin and the miniature use it",
    "eval.mini.data": "the miniature's data; its CLIP and base read the splits' constants",
    "eval.mini.preflight": "the miniature's checks; its pipeline runs them first",
    "visionzip.bench": "the encoder benchmark's meters; llava.bench builds on them",
}


@dataclass(frozen=True)
class Arrow:
    """One use of ``target`` by ``source``: an import or a ``python -m`` subprocess."""

    source: str
    target: str
    where: str  # path:line
    kind: str  # "import" | "subprocess"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def _resolve_relative(module: str, level: int, name: str | None, is_package: bool) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def arrows(path: Path) -> list[Arrow]:
    """Every import and ``-m`` subprocess in ``path`` that names one of our packages."""
    source = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Arrow] = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(source, node.level, node.module, path.name == "__init__.py")
            targets = [base]
        elif isinstance(node, (ast.List, ast.Tuple)):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            for flag, value in itertools.pairwise(items):
                if flag == "-m" and isinstance(value, str):
                    found.append(Arrow(source, value, f"{path.relative_to(REPO)}:{node.lineno}", "subprocess"))
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                found.append(Arrow(source, target, f"{path.relative_to(REPO)}:{node.lineno}", "import"))
    return found


def all_arrows() -> list[Arrow]:
    return [arrow for path in source_files() for arrow in arrows(path)]


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_scan_sees_the_arrows_it_must_judge() -> None:
    """The scanner is not vacuous: it finds known arrows of each kind (llava uses visionzip, the miniature runs
    eval.grid as a subprocess, the integrations use the core)."""
    found = {(a.source.split(".")[0], a.target.split(".")[0], a.kind) for a in all_arrows()}
    assert ("llava", "visionzip", "import") in found
    assert ("eval", "llava", "import") in found
    assert ("eval", "eval", "subprocess") in found
    assert any(_within(a.source, INTEGRATIONS) and not _within(a.target, INTEGRATIONS) for a in all_arrows())


def test_packages_point_down() -> None:
    """eval/ -> llava/ -> visionzip/: nothing imports or runs a module of a higher layer."""
    wrong = [a for a in all_arrows() if RANK[a.target.split(".")[0]] > RANK[a.source.split(".")[0]]]
    assert not wrong, "arrows pointing up:\n" + "\n".join(
        f"{a.where}: {a.source} -> {a.target} ({a.kind})" for a in wrong
    )


def test_visionzip_core_does_not_use_its_integrations() -> None:
    wrong = [
        a
        for a in all_arrows()
        if a.source.startswith("visionzip") and not _within(a.source, INTEGRATIONS) and _within(a.target, INTEGRATIONS)
    ]
    assert not wrong, "core -> integration:\n" + "\n".join(f"{a.where}: {a.source} -> {a.target}" for a in wrong)


def commands() -> list[str]:
    """Modules that exist to be run (a ``__main__`` guard, or a package's ``__main__``), less the libraries above."""
    found = [
        module_name(path)
        for path in source_files()
        if path.name == "__main__.py" or 'if __name__ == "__main__":' in path.read_text()
    ]
    return [name for name in found if name not in LIBRARIES_WITH_A_COMMAND]


def test_the_commands_are_found() -> None:
    found = commands()
    for name in (
        "llava.eval.run_llava",
        "llava.convert",
        "llava.serve.cli",
        "llava.serve.show",
        "llava.bench.__main__",
    ):
        assert name in found
    assert set(LIBRARIES_WITH_A_COMMAND) <= {module_name(path) for path in source_files()}


def test_no_module_imports_a_command() -> None:
    """Command-line modules hold their command only; nothing imports from them (running them is fine), except a
    package's ``__main__``, which is the command of that package."""
    names = commands()
    wrong = [
        a
        for a in all_arrows()
        if a.kind == "import"
        and _within(a.target, tuple(names))
        and not a.source.endswith("__main__")
        and a.target != a.source
    ]
    assert not wrong, "imports of command modules:\n" + "\n".join(f"{a.where}: {a.source} -> {a.target}" for a in wrong)
