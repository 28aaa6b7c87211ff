"""Training data in LLaVA's JSON/JSONL format: conversations -> token ids with labels on the assistant turns only."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import Conversation, SeparatorStyle, get_conv_template
from llava.mm_utils import load_image, process_images

logger = logging.getLogger(__name__)

ROLE_OF = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}  # LLaVA's "from" values -> template role index
REPORT_FIRST = 10  # how many missing image paths an error message lists
CHECK_THREADS = 16  # parallel file checks before training


# ----------------------------------------------------------------------------------------------------------------------
# reading


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """LLaVA's data file: a JSON list (``llava_v1_5_mix665k.json``) or JSON Lines, one sample per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data_path {path} does not exist")
    text = path.read_text()
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list) or not rec["conversations"]:
            raise ValueError(f"{path}: sample {i} has no 'conversations' list: {str(rec)[:200]}")
    return records


def image_files(record: dict[str, Any]) -> list[str]:
    """The sample's image paths (``image`` is absent, one path, or a list of paths)."""
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def take_fraction(records: list[dict[str, Any]], fraction: float, seed: int) -> list[dict[str, Any]]:
    """A seeded subset of ``round(fraction * n)`` samples in their original order (the paper's 1/10 recipe)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--data_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return records
    count = max(1, round(fraction * len(records)))
    chosen = sorted(random.Random(seed).sample(range(len(records)), count))
    return [records[i] for i in chosen]


def check_images(
    records: list[dict[str, Any]], image_folder: str | Path | None, skip_missing: bool, show_progress: bool = True
) -> list[dict]:
    """Open every image once before training so a bad file fails now, not hours into an epoch.

    Raises ValueError with the count and the first paths unless ``skip_missing``, which drops those samples.
    """
    folder = Path(image_folder) if image_folder else Path()
    paths = [(i, folder / name) for i, rec in enumerate(records) for name in image_files(rec)]
    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:  # file reads: threads overlap the I/O waits
        problems = list(tqdm(pool.map(_image_problem, [p for _, p in paths]), total=len(paths),
                             desc="checking images", disable=not show_progress or not paths))  # fmt: skip
    bad = [(i, str(path), why) for (i, path), why in zip(paths, problems, strict=True) if why]
    if not bad:
        return records
    listing = "\n  ".join(f"{path}: {why}" for _, path, why in bad[:REPORT_FIRST])
    samples = {i for i, _, _ in bad}
    if not skip_missing:
        raise ValueError(
            f"{len(bad)} image(s) in {len(samples)} sample(s) are missing or unreadable (first {REPORT_FIRST}):\n  "
            f"{listing}\nfix --image_folder, or pass --skip_missing_images to drop these samples"
        )
    logger.warning("dropping %d of %d samples with missing or unreadable images:\n  %s", len(samples), len(records),
                   listing)  # fmt: skip
    return [rec for i, rec in enumerate(records) if i not in samples]


def _image_problem(path: Path) -> str | None:
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            image.verify()  # reads the whole file without decoding pixels: catches truncation and bad headers
    except (OSError, SyntaxError) as err:
        return f"unreadable ({err})"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# conversations -> prompt text with the spans the model is trained on


def normalise_turns(record: dict[str, Any], n_images: int) -> list[tuple[int, str]]:
    """(role index, text) per turn, with LLaVA's placeholder conventions.

    A leading gpt turn is dropped (as LLaVA does); turns must then alternate human/gpt. A sample must hold one
    ``<image>`` per image file, except that placeholders absent altogether are put before the first question. With
    one image, the placeholder moves to the front of its turn followed by a newline (LLaVA's
    ``preprocess_multimodal``); several images stay where the text puts them (interleaved).
    """
    raw = record["conversations"]
    turns = [(ROLE_OF.get(str(t.get("from", "")).lower(), -1), str(t.get("value", ""))) for t in raw]
    if any(role < 0 for role, _ in turns):
        raise ValueError(f"sample {record.get('id')}: 'from' must be one of {sorted(ROLE_OF)}")
    if turns and turns[0][0] == 1:
        turns = turns[1:]
    if not turns or any(role != i % 2 for i, (role, _) in enumerate(turns)):
        raise ValueError(f"sample {record.get('id')}: turns must alternate human/gpt, starting with human")
    found = sum(text.count(DEFAULT_IMAGE_TOKEN) for _, text in turns)
    if n_images and found == 0:
        turns[0] = (0, DEFAULT_IMAGE_TOKEN * n_images + "\n" + turns[0][1])
    elif found != n_images:
        raise ValueError(f"sample {record.get('id')}: {found} '<image>' placeholder(s) for {n_images} image file(s)")
    if n_images == 1:
        turns = [(role, _image_first(text)) if DEFAULT_IMAGE_TOKEN in text else (role, text) for role, text in turns]
    return turns


def _image_first(text: str) -> str:
    return DEFAULT_IMAGE_TOKEN + "\n" + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()


def render_with_targets(template_name: str, turns: list[tuple[int, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The full prompt and the character spans of what the model must produce (answers and their end markers).

    A target is exactly the text the template adds after its generation prompt for that assistant turn: render
    the conversation up to the turn with the turn left open, then with the answer; the difference is the target.
    The ``plain`` (pretraining) template: see :func:`_render_plain`.
    """
    template = get_conv_template(template_name)
    if template.sep_style == SeparatorStyle.PLAIN:
        return _render_plain(template, turns)
    spans, partials, conv = [], [], template.copy()
    for role, text in turns:
        if role == 1:
            conv.append_message(template.roles[1], None)
            start = len(conv.get_prompt())
            conv.messages[-1][1] = text
            partials.append(conv.get_prompt())
            spans.append((start, len(partials[-1])))
        else:
            conv.append_message(template.roles[0], text)
    prompt = conv.get_prompt()
    if not all(prompt.startswith(p) for p in partials):
        raise ValueError(f"template {template_name!r} does not render a conversation's turns as prefixes of it")
    return prompt, spans


def _render_plain(template: Conversation, turns: list[tuple[int, str]]) -> tuple[str, list[tuple[int, int]]]:
    """LLaVA's stage 1: the image placeholders alone, then the caption and the separator, which is the target."""
    if len(turns) != 2:
        raise ValueError(f"the 'plain' template takes one human and one gpt turn per sample, got {len(turns)} turns")
    prefix = DEFAULT_IMAGE_TOKEN * turns[0][1].count(DEFAULT_IMAGE_TOKEN)
    prompt = prefix + turns[1][1] + template.sep
    return prompt, [(len(prefix), len(prompt))]


def tokenize_with_targets(
    prompt: str, spans: Sequence[tuple[int, int]], tokenizer: Any, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (``IMAGE_TOKEN_INDEX`` at each ``<image>``) and labels: a token is a target when its characters
    overlap a target span, everything else ``IGNORE_INDEX``. Truncated to ``max_length`` tokens.

    Returns:
        input_ids (L,), labels (L,).
    """
    ids: list[int] = []
    labels: list[int] = []
    offset = 0
    for i, chunk in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            offset += len(DEFAULT_IMAGE_TOKEN)
        enc = tokenizer(chunk, add_special_tokens=(i == 0), return_offsets_mapping=True)
        for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            a, b = a + offset, b + offset
            is_target = b > a and any(a < end and b > start for start, end in spans)
            ids.append(token)
            labels.append(token if is_target else IGNORE_INDEX)
        offset += len(chunk)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------------
# dataset and collator


@dataclass
class ImageSettings:
    """How images become pixels: the tower's processor and LLaVA's ``image_aspect_ratio`` (+ AnyRes pinpoints)."""

    processor: Any
    image_aspect_ratio: str | None = "square"
    image_grid_pinpoints: Any = None


def blank_image(settings: ImageSettings, side: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """A black ``side`` x ``side`` image preprocessed as the data's images are (so AnyRes gives it crops too).

    Returns:
        pixels (3, H, W), or (V, 3, H, W) for AnyRes; the image's (width, height).
    """
    image = Image.new("RGB", (side, side))
    return process_images([image], settings.processor, settings)[0], image.size


class LazySupervisedDataset(Dataset):
    """LLaVA's samples, tokenized and their images loaded when asked for (so 665K samples start instantly)."""

    def __init__(self, records: list[dict[str, Any]], tokenizer: Any, template: str, image_folder: str | Path | None,
                 images: ImageSettings | None, max_length: int | None = None) -> None:  # fmt: skip
        get_conv_template(template)  # fail now on an unknown template name
        self.records, self.tokenizer, self.template = records, tokenizer, template
        self.image_folder = Path(image_folder) if image_folder else Path()
        self.images, self.max_length = images, max_length
        if images is None and any(image_files(r) for r in records):
            raise ValueError("the data has images but no image processor was given (is the model multimodal?)")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Rough text length per sample, positive with images and negative without (for modality grouping)."""
        lengths = []
        for rec in self.records:
            words = sum(len(str(t.get("value", "")).split()) for t in rec["conversations"])
            lengths.append(words if image_files(rec) else -words)
        return lengths

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        names = image_files(rec)
        turns = normalise_turns(rec, len(names))
        prompt, spans = render_with_targets(self.template, turns)
        input_ids, labels = tokenize_with_targets(prompt, spans, self.tokenizer, self.max_length)
        item: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "images": [], "image_sizes": []}
        for name in names:
            image = load_image(self.image_folder / name)
            pixels = process_images([image], self.images.processor, self.images)
            item["images"].append(pixels[0])  # (3, H, W), or (V, 3, H, W) for AnyRes
            item["image_sizes"].append(image.size)
        kept = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        if kept != len(names):
            raise ValueError(f"sample {rec.get('id')}: --model_max_length cut an image placeholder; raise it")
        return item


@dataclass
class DataCollator:
    """Pads a batch on the right; images of all samples go to the model as one list in reading order."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(item["input_ids"].shape[0] for item in items)
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)  # from lengths: pad may equal a real token id
        for i, item in enumerate(items):
            n = item["input_ids"].shape[0]
            ids[i, :n], labels[i, :n], mask[i, :n] = item["input_ids"], item["labels"], 1
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        images = [img for item in items for img in item["images"]]
        if images:
            same = all(img.shape == images[0].shape for img in images)
            batch["images"] = torch.stack(images) if same else images
            batch["image_sizes"] = [size for item in items for size in item["image_sizes"]]
        return batch
