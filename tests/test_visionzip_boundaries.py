"""visionzip's core imports only torch: transformers, matplotlib and our higher layers stay out of a fresh process."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import visionzip

# Not the core: the transformers integrations, the kept-token drawing (matplotlib) and the benchmark tooling
# (transformers' encoders, torch's private dispatch API). README: "The method as a library".
OUTSIDE_CORE = ("visionzip.hf", "visionzip.show", "visionzip.bench")
FORBIDDEN = ("transformers", "matplotlib", "PIL", "vllm", "llava", "eval")


def core_modules() -> list[str]:
    """Every module under visionzip/ but the named exceptions (a new core module is covered without listing it)."""
    found = pkgutil.walk_packages([str(Path(visionzip.__file__).parent)], prefix="visionzip.")
    names = ["visionzip", *(info.name for info in found)]
    return sorted(n for n in names if not any(n == o or n.startswith(o + ".") for o in OUTSIDE_CORE))


def test_core_modules_import_only_torch() -> None:
    modules = core_modules()
    assert {"visionzip.core", "visionzip.config", "visionzip.capture", "visionzip.encoders", "visionzip.anyres"} <= set(
        modules
    )
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "torch" in loaded
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))


def test_show_imports_matplotlib_only_to_draw() -> None:
    """``visionzip.show`` imports matplotlib where a figure is drawn, not at import."""
    script = "import sys, visionzip.show\nprint('matplotlib' in sys.modules, 'transformers' in sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    assert done.stdout.split() == ["False", "False"]
