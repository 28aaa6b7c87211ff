"""easy-VQA and the seeded small-object and multi-object splits, in LLaVA's training format (python -m eval.mini.data).

Layout of ``--out`` (one folder per split kind, ``easy``, ``small`` and ``multi``; image paths are relative to it, so
it is the ``--image_folder`` of training and evaluation):

    <kind>/images/{train,test}/<n>.png   the images (easy: copied from the package; small, multi: drawn)
    <kind>/{train,test}.json             LLaVA samples, one question each (``vicuna_v1`` style stage 2 data)
    <kind>/pretrain.json                 one caption per training image (``plain`` template, stage 1 data)
    <kind>/images_{train,test}.json      per image: caption and objects (shape, color, box), for CLIP and probes
    <kind>/stats.json                    answer set, counts, majority-answer baselines on the test split
    <kind>/manifest.json                 the settings the folder was written with (written last: resume marker)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from eval.mini.shapes import (
    COLORS,
    MULTI_ANSWERS,
    PALETTE,
    QA,
    SHAPES,
    SceneConfig,
    Shape,
    SmallConfig,
    caption,
    make_example,
    make_small_example,
)
from llava.constants import DEFAULT_IMAGE_TOKEN

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("easy", "small", "multi")
SPLITS: tuple[str, ...] = ("train", "test")
ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
MANIFEST_VERSION = 1
# easy-VQA's 13 answers (its data/answers.txt): 3 shapes, 8 colours, yes/no.
EASY_ANSWERS: tuple[str, ...] = (*SHAPES, *COLORS, "yes", "no")
# Pixel tests that tell easy-VQA's shapes apart (measured on all 5,000 images; every question agrees, see
# `_check_easy_object`): a rectangle fills its box; a triangle is far from symmetric top-to-bottom (IoU of the mask
# and its vertical flip <= 0.48), a circle close to it (>= 0.77).
RECTANGLE_FILL = 0.99
TRIANGLE_MAX_FLIP_IOU = 0.6


@dataclass(frozen=True)
class DataConfig:
    """What one run of the converter writes; saved in manifest.json and compared on resume."""

    kind: str = "easy"
    seed: int = 0  # drawn kinds only (easy-VQA is fixed)
    train_images: int = 4000  # drawn kinds only; easy uses all 4,000 / 1,000 images
    test_images: int = 500
    limit: int | None = None  # at most this many images per split (smoke runs)
    scene: SceneConfig = field(default_factory=SceneConfig)  # multi only
    small: SmallConfig = field(default_factory=SmallConfig)  # small only

    def __post_init__(self) -> None:
        """Validate the kind and the sizes."""
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.train_images < 1 or self.test_images < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"expected positive image counts and limit, got {self}")

    def images(self, split: str) -> int | None:
        """How many images of `split` to write (None: all that easy-VQA has, up to `limit`)."""
        wanted = None if self.kind == "easy" else {"train": self.train_images, "test": self.test_images}[split]
        if self.limit is None:
            return wanted
        return self.limit if wanted is None else min(wanted, self.limit)

    def to_json(self) -> dict[str, Any]:
        """The settings that decide the output: fields of the other kinds are dropped."""
        data = asdict(self)
        unused = {"easy": ("seed", "train_images", "test_images", "scene", "small"), "small": ("scene",),
                  "multi": ("small",)}[self.kind]  # fmt: skip
        for key in unused:
            data.pop(key)
        return data


def human_turn(question: str) -> str:
    """The first (human) turn of a VQA sample, as LLaVA-1.5 phrases short-answer questions."""
    return f"{DEFAULT_IMAGE_TOKEN}\n{question}\n{ANSWER_INSTRUCTION}"


def vqa_record(sample_id: str, image: str, qa: QA) -> dict[str, Any]:
    """One LLaVA sample; `question`, `answer` and `question_type` are extra keys for evaluation (unused in training)."""
    return {
        "id": sample_id,
        "image": image,
        "conversations": [{"from": "human", "value": human_turn(qa.question)}, {"from": "gpt", "value": qa.answer}],
        "question": qa.question,
        "answer": qa.answer,
        "question_type": qa.qtype,
    }


def caption_record(sample_id: str, image: str, text: str) -> dict[str, Any]:
    """One stage-1 sample: the ``plain`` template reads only the image and the caption."""
    return {
        "id": sample_id,
        "image": image,
        "conversations": [{"from": "human", "value": DEFAULT_IMAGE_TOKEN}, {"from": "gpt", "value": text}],
    }


# ----------------------------------------------------------------------------------------------------------------------
# easy-VQA


def easy_object(pixels: np.ndarray) -> Shape:
    """The single object of an easy-VQA image (H, W, 3) uint8, read from its pixels.

    Colour: the palette colour with the most exactly matching pixels (the shapes are drawn without anti-aliasing on
    a background that is never a palette colour). Shape: see RECTANGLE_FILL and TRIANGLE_MAX_FLIP_IOU.
    """
    matches = {name: np.all(pixels == np.array(rgb, dtype=pixels.dtype), axis=-1) for name, rgb in PALETTE.items()}
    color = max(matches, key=lambda name: int(matches[name].sum()))
    mask = matches[color]
    if not mask.any():
        raise ValueError("easy-VQA image without any palette-coloured pixel")
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    crop = mask[box[1] : box[3] + 1, box[0] : box[2] + 1]
    flip_iou = (crop & crop[::-1]).sum() / (crop | crop[::-1]).sum()
    if crop.mean() >= RECTANGLE_FILL:
        shape = "rectangle"
    elif flip_iou < TRIANGLE_MAX_FLIP_IOU:
        shape = "triangle"
    else:
        shape = "circle"
    return Shape(shape, color, box)


def easy_answer(question: str, obj: Shape) -> str | None:
    """What `question` should answer about `obj`, for the yes/no questions (None for what-questions).

    easy-VQA's yes/no questions name one shape or colour and may be negated ("is there not a ...", "is no ...").
    """
    words = question.rstrip("?").split()
    if words[0] == "what":
        return None
    named = [w for w in words if w in SHAPES or w in COLORS]
    if len(named) != 1:
        raise ValueError(f"easy-VQA yes/no question naming {len(named)} attributes: {question!r}")
    present = named[0] in (obj.shape, obj.color)
    negated = "not" in words or "no" in words
    return "yes" if present != negated else "no"


def _check_easy_object(obj: Shape, questions: Sequence[tuple[str, str]], image: str) -> None:
    """Raise ValueError unless every easy-VQA answer about `image` agrees with the object read from its pixels."""
    for question, answer in questions:
        expected = easy_answer(question, obj)
        if expected is None:
            expected = obj.shape if answer in SHAPES else obj.color
        if answer != expected:
            raise ValueError(f"{image}: read {obj} from the pixels, but {question!r} answers {answer!r}")


def _easy_qtype(answer: str) -> str:
    """easy-VQA's question kinds, by answer: shape, color or yes/no."""
    return "shape" if answer in SHAPES else "color" if answer in COLORS else "yes/no"


def _easy_source(split: str) -> tuple[dict[int, list[tuple[str, str]]], dict[int, str]]:
    """easy-VQA's questions grouped by image id, and the image files, of `split`."""
    try:
        import easy_vqa
    except ImportError as err:  # optional: only the mini reproduction needs it
        raise ImportError("the easy split needs the easy-VQA package: pip install easy-vqa") from err
    texts, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    questions: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for text, answer, image_id in zip(texts, answers, image_ids, strict=True):
        questions[image_id].append((text, answer))
    return questions, getattr(easy_vqa, f"get_{split}_image_paths")()


def easy_split(cfg: DataConfig, split: str, split_dir: Path) -> tuple[list[dict], list[dict]]:
    """Copy the images of one easy-VQA split into `split_dir`; return its samples and per-image metadata."""
    questions, paths = _easy_source(split)
    ids = sorted(paths)[: cfg.images(split)]
    (split_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    records, meta = [], []
    for image_id in tqdm(ids, desc=f"easy {split}", unit="img"):
        rel = f"images/{split}/{image_id}.png"
        with Image.open(paths[image_id]) as image:
            obj = easy_object(np.asarray(image.convert("RGB")))
        _check_easy_object(obj, questions[image_id], rel)
        shutil.copyfile(paths[image_id], split_dir / rel)
        meta.append({"image": rel, "caption": caption([obj]), "objects": [obj.to_json()]})
        for k, (text, answer) in enumerate(questions[image_id]):
            records.append(vqa_record(f"easy-{split}-{image_id}-{k}", rel, QA(text, answer, _easy_qtype(answer))))
    return records, meta


# ----------------------------------------------------------------------------------------------------------------------
# drawn splits: small and multi


def drawn_split(cfg: DataConfig, split: str, split_dir: Path) -> tuple[list[dict], list[dict]]:
    """Draw the images of one generated split (``small`` or ``multi``) into `split_dir`; return its samples and
    per-image metadata."""
    (split_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    records, meta = [], []
    for index in tqdm(range(cfg.images(split)), desc=f"{cfg.kind} {split}", unit="img"):
        if cfg.kind == "small":
            scene, image, questions = make_small_example(cfg.seed, split, index, cfg.small)
        else:
            scene, image, questions = make_example(cfg.seed, split, index, cfg.scene)
        rel = f"images/{split}/{index:05d}.png"
        image.save(split_dir / rel)
        meta.append({"image": rel, "caption": caption(scene), "objects": [obj.to_json() for obj in scene]})
        records.extend(vqa_record(f"{cfg.kind}-{split}-{index}-{k}", rel, qa) for k, qa in enumerate(questions))
    return records, meta


# ----------------------------------------------------------------------------------------------------------------------
# statistics, writing, resume


def majority_baselines(train: Sequence[dict], test: Sequence[dict]) -> dict[str, Any]:
    """Accuracy on `test` of answering every question with the most frequent training answer, overall and per type.

    The per-type baseline knows the question's type (answers the type's most frequent training answer): the
    accuracy of a model that reads the question but not the image, roughly.
    """
    overall = Counter(r["answer"] for r in train).most_common(1)[0][0]
    by_type: dict[str, Counter] = defaultdict(Counter)
    for r in train:
        by_type[r["question_type"]][r["answer"]] += 1
    type_majority = {qtype: counts.most_common(1)[0][0] for qtype, counts in sorted(by_type.items())}
    hits = sum(r["answer"] == overall for r in test)
    type_hits = sum(r["answer"] == type_majority.get(r["question_type"]) for r in test)
    return {
        "majority_answer": overall,
        "majority_accuracy": hits / len(test),
        "type_majority_answers": type_majority,
        "type_majority_accuracy": type_hits / len(test),
    }


def split_stats(kind: str, records: dict[str, list[dict]], meta: dict[str, list[dict]]) -> dict[str, Any]:
    """Answer set, sizes, answer and question-type counts per split, and the test split's majority baselines."""
    stats: dict[str, Any] = {"kind": kind, "answers": list(MULTI_ANSWERS if kind == "multi" else EASY_ANSWERS)}
    for split in SPLITS:
        stats[split] = {
            "images": len(meta[split]),
            "questions": len(records[split]),
            "answer_counts": dict(Counter(r["answer"] for r in records[split]).most_common()),
            "type_counts": dict(Counter(r["question_type"] for r in records[split]).most_common()),
        }
    unknown = {r["answer"] for split in SPLITS for r in records[split]} - set(stats["answers"])
    if unknown:
        raise ValueError(f"{kind}: answers outside the closed answer set {stats['answers']}: {sorted(unknown)}")
    stats["test"].update(majority_baselines(records["train"], records["test"]))
    return stats


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temporary file renamed into place), so an interrupted run leaves no half file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def is_done(out_dir: Path, expected: dict[str, Any], what: str) -> bool:
    """True if `out_dir/manifest.json` records `expected`; False if there is none; ValueError if it differs."""
    manifest = out_dir / "manifest.json"
    if not manifest.is_file():
        return False
    got = json.loads(manifest.read_text())
    if got != expected:
        changed = {
            key: (got.get(key), expected.get(key)) for key in {*got, *expected} if got.get(key) != expected.get(key)
        }
        raise ValueError(f"{out_dir} holds {what} written with other settings (key: (found, expected)): {changed}; "
                         "remove the folder first")  # fmt: skip
    return True


SPLIT_WRITERS: dict[str, Callable[[DataConfig, str, Path], tuple[list[dict], list[dict]]]] = {
    "easy": easy_split,
    "small": drawn_split,
    "multi": drawn_split,
}


def write_kind(cfg: DataConfig, out: str | Path) -> Path:
    """Write one kind (easy, small or multi) into `out/<kind>`, unless a finished run with these settings is there."""
    split_dir = Path(out) / cfg.kind
    expected = json.loads(json.dumps({"version": MANIFEST_VERSION, **cfg.to_json()}))  # tuples as JSON lists
    if is_done(split_dir, expected, f"the {cfg.kind} split"):
        logger.info("%s already written with these settings: skipping", split_dir)
        return split_dir
    split_dir.mkdir(parents=True, exist_ok=True)
    records, meta = {}, {}
    for split in SPLITS:
        records[split], meta[split] = SPLIT_WRITERS[cfg.kind](cfg, split, split_dir)
        write_json(split_dir / f"{split}.json", records[split])
        write_json(split_dir / f"images_{split}.json", meta[split])
    pretrain = [caption_record(f"{cfg.kind}-cap-{i}", m["image"], m["caption"]) for i, m in enumerate(meta["train"])]
    write_json(split_dir / "pretrain.json", pretrain)
    stats = split_stats(cfg.kind, records, meta)
    write_json(split_dir / "stats.json", stats)
    write_json(split_dir / "manifest.json", expected)
    test = stats["test"]
    logger.info(
        "%s: %d/%d train/test images, %d/%d questions; test majority baseline %.3f (%r), per-type %.3f",
        split_dir, stats["train"]["images"], test["images"], stats["train"]["questions"], test["questions"],
        test["majority_accuracy"], test["majority_answer"], test["type_majority_accuracy"],
    )  # fmt: skip
    return split_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write the chosen splits (all three by default)."""
    parser = argparse.ArgumentParser(prog="python -m eval.mini.data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for easy/, small/ and multi/")
    parser.add_argument("--split", nargs="+", choices=(*KINDS, "all"), default=["all"])
    parser.add_argument("--limit", type=int, default=None, help="at most N images per split (smoke runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn splits")
    parser.add_argument("--train-images", type=int, default=DataConfig.train_images, help="drawn training images")
    parser.add_argument("--test-images", type=int, default=DataConfig.test_images, help="drawn test images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for kind in KINDS if "all" in args.split else args.split:
        cfg = DataConfig(kind, args.seed, args.train_images, args.test_images, args.limit)
        write_kind(cfg, args.out)


if __name__ == "__main__":
    main()
