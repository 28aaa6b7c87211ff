"""A tiny LLaVA-format evaluation set: three one-colour images, two questions each, written to a folder."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

SHAPES = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def write_llava_items(folder: Path) -> Path:
    """Three one-colour images, two questions each, in LLaVA's training format (paths relative to ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for name, colour in SHAPES.items():
        Image.new("RGB", (48, 32), colour).save(folder / f"{name}.png")
        turns = [
            {"from": "human", "value": "<image>\nWhat colour is the image?"},
            {"from": "gpt", "value": name},
            {"from": "human", "value": "Is it a photo?"},
            {"from": "gpt", "value": "no"},
        ]
        items.append({"id": name, "image": f"{name}.png", "conversations": turns})
    path = folder / "items.json"
    path.write_text(json.dumps(items))
    return path
