"""The sample photo the commands run on (the web demo's chelsea.jpg) and how many tokens their tests generate."""

from __future__ import annotations

from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "llava/serve/examples/chelsea.jpg"
MAX_NEW = 12
