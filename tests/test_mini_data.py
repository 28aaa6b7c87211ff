"""Tests for eval.mini.shapes and eval.mini.data: the multi-object generator and the LLaVA-format writers."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.mini.data import (
    ANSWER_INSTRUCTION,
    EASY_ANSWERS,
    DataConfig,
    easy_answer,
    easy_object,
    majority_baselines,
    write_kind,
)
from eval.mini.shapes import (
    MULTI_ANSWERS,
    PALETTE,
    QUESTION_TYPES,
    SHAPES,
    SceneConfig,
    Shape,
    all_questions,
    caption,
    draw_scene,
    extreme_object,
    make_example,
    scene_questions,
)
from llava.constants import DEFAULT_IMAGE_TOKEN

CFG = SceneConfig()
# A scene to check answers by hand: two circles (red top-left, blue bottom-right), a green triangle top-right.
HAND_SCENE = [
    Shape("circle", "red", (4, 4, 19, 19)),
    Shape("circle", "blue", (60, 60, 79, 79), small=False),
    Shape("triangle", "green", (70, 6, 79, 15), small=True),
]
HAND_FACTS = {
    "what shape is the red object?": "circle",
    "what is the red shape?": "circle",
    "what is the blue shape?": "circle",
    "what is the green shape?": "triangle",
    "what shape is the green object?": "triangle",
    "what shape is the blue object?": "circle",
    "what color is the triangle?": "green",
    "what is the color of the triangle?": "green",
    "what color is the shape on the left?": "red",
    "what shape is on the left?": "circle",
    "what color is the shape at the bottom?": "blue",
    "what shape is at the bottom?": "circle",
    "how many circles are there?": "2",
    "how many triangles are there?": "1",
    "how many rectangles are there?": "0",
    "how many shapes are there?": "3",
    "is there a red circle?": "yes",
    "is there a blue circle?": "yes",
    "is there a green triangle?": "yes",
}


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_same_seed_same_example_other_seed_other_example() -> None:
    for index in range(5):
        scene_a, image_a, qa_a = make_example(7, "train", index, CFG)
        scene_b, image_b, qa_b = make_example(7, "train", index, CFG)
        assert scene_a == scene_b and qa_a == qa_b
        assert np.array_equal(_pixels(image_a), _pixels(image_b))
    others = [make_example(8, "train", i, CFG)[0] for i in range(5)]
    assert others != [make_example(7, "train", i, CFG)[0] for i in range(5)]
    assert make_example(7, "test", 0, CFG)[0] != make_example(7, "train", 0, CFG)[0]


def test_hand_scene_answers() -> None:
    """Every question asked about the hand-made scene, over many random draws, has the answer read off by hand."""
    asked = set()
    for seed in range(200):
        for qa in scene_questions(random.Random(seed), HAND_SCENE, CFG):
            asked.add(qa.question)
            if qa.question in HAND_FACTS:
                assert qa.answer == HAND_FACTS[qa.question], qa
            else:  # the "no" of a yes/no pair: a colour-shape pair that is not in the scene
                assert qa.answer == "no" and qa.qtype == "exists", qa
                assert qa.question not in {f"is there a {o.color} {o.shape}?" for o in HAND_SCENE}
    # the two circles make "what color is the circle?" ambiguous: never asked; the top is ambiguous too (red and
    # green centres are 1 px apart), the right (green 74.5 vs blue 69.5) is closer than the 12 px gap
    assert not any("circle?" in q and q.startswith("what") for q in asked)
    assert not any("top" in q or "right" in q for q in asked)
    assert {"how many circles are there?", "what color is the shape on the left?"} <= asked


def test_extreme_object_needs_a_clear_lead() -> None:
    assert extreme_object(HAND_SCENE, "left", 12) == HAND_SCENE[0]
    assert extreme_object(HAND_SCENE, "bottom", 12) == HAND_SCENE[1]
    assert extreme_object(HAND_SCENE, "right", 12) is None  # green (74.5) leads blue (69.5) by 5 px only
    assert extreme_object(HAND_SCENE, "right", 5) == HAND_SCENE[2]
    assert extreme_object(HAND_SCENE, "top", 1) == HAND_SCENE[2]  # green (10.5) leads red (11.5) by 1 px
    assert extreme_object(HAND_SCENE, "top", 2) is None


def _drawn_objects(image: Image.Image) -> dict[str, int]:
    """Pixels per palette colour found in the image."""
    pixels = _pixels(image)
    counts = {name: int(np.all(pixels == rgb, axis=-1).sum()) for name, rgb in PALETTE.items()}
    return {name: n for name, n in counts.items() if n}


def test_generated_scenes_are_drawn_as_described_and_answered_correctly() -> None:
    types = Counter()
    for index in range(60):
        scene, image, questions = make_example(0, "train", index, CFG)
        assert CFG.min_objects <= len(scene) <= CFG.max_objects
        assert set(_drawn_objects(image)) == {o.color for o in scene}  # every object visible, nothing else
        pixels = _pixels(image)
        for obj in scene:  # each object's pixels lie inside its own box
            ys, xs = np.nonzero(np.all(pixels == PALETTE[obj.color], axis=-1))
            x0, y0, x1, y1 = obj.box
            assert x0 <= xs.min() and xs.max() <= x1 and y0 <= ys.min() and ys.max() <= y1
        for qa in questions:
            types[qa.qtype] += 1
            assert qa.answer in MULTI_ANSWERS and qa.question in all_questions()
            if qa.qtype == "count_shape":  # the count equals the objects of that shape drawn
                shape = next(s for s in SHAPES if f"many {s}s" in qa.question)
                assert qa.answer == str(sum(o.shape == shape for o in scene))
            if qa.question.endswith("on the left?"):  # the answer belongs to the leftmost object
                leftmost = min(scene, key=lambda o: o.center[0])
                assert qa.answer in (leftmost.color, leftmost.shape)
                assert all(o.center[0] - leftmost.center[0] >= CFG.position_gap for o in scene if o != leftmost)
            if qa.qtype == "exists":
                present = any(qa.question == f"is there a {o.color} {o.shape}?" for o in scene)
                assert qa.answer == ("yes" if present else "no")
        assert sum(qa.answer == "yes" for qa in questions) == sum(qa.answer == "no" for qa in questions) == 1
    assert set(types) == set(QUESTION_TYPES)


def test_caption_reads_left_to_right() -> None:
    assert caption(HAND_SCENE) == "a red circle, a blue circle and a small green triangle"
    assert caption(HAND_SCENE[:1]) == "a red circle"


def test_easy_object_from_pixels_and_easy_answers() -> None:
    scene = [Shape("triangle", "teal", (10, 20, 40, 45))]
    image = draw_scene(scene, random.Random(0), 64)
    obj = easy_object(_pixels(image))
    assert (obj.shape, obj.color, obj.box) == ("triangle", "teal", (10, 20, 40, 45))
    assert easy_answer("is there a teal shape?", obj) == "yes"
    assert easy_answer("is there not a triangle in the image?", obj) == "no"
    assert easy_answer("is no red shape present?", obj) == "yes"
    assert easy_answer("what color is the shape?", obj) is None


def test_majority_baselines() -> None:
    pairs = [("yes", "e"), ("yes", "e"), ("yes", "e"), ("red", "c"), ("blue", "c"), ("blue", "c")]
    train = [{"answer": a, "question_type": t} for a, t in pairs]
    test = [{"answer": a, "question_type": t} for a, t in [("yes", "e"), ("no", "e"), ("blue", "c"), ("red", "c")]]
    out = majority_baselines(train, test)
    assert out["majority_answer"] == "yes" and out["majority_accuracy"] == 0.25
    assert out["type_majority_answers"] == {"c": "blue", "e": "yes"} and out["type_majority_accuracy"] == 0.5


def _check_llava_json(split_dir: Path, answers: tuple[str, ...]) -> None:
    """Samples have LLaVA's keys, the VQA prompt, an answer from the closed set and an existing image."""
    for split in ("train", "test"):
        records = json.loads((split_dir / f"{split}.json").read_text())
        assert records and len({r["id"] for r in records}) == len(records)
        for record in records:
            human, gpt = record["conversations"]
            prompt = f"{DEFAULT_IMAGE_TOKEN}\n{record['question']}\n{ANSWER_INSTRUCTION}"
            assert human == {"from": "human", "value": prompt}
            assert gpt == {"from": "gpt", "value": record["answer"]} and record["answer"] in answers
            assert (split_dir / record["image"]).is_file()
    for record in json.loads((split_dir / "pretrain.json").read_text()):
        assert record["conversations"][0] == {"from": "human", "value": DEFAULT_IMAGE_TOKEN}
        assert record["conversations"][1]["from"] == "gpt" and (split_dir / record["image"]).is_file()
    stats = json.loads((split_dir / "stats.json").read_text())
    assert 0 < stats["test"]["majority_accuracy"] <= stats["test"]["type_majority_accuracy"] < 1


def test_write_multi(tmp_path: Path) -> None:
    cfg = DataConfig("multi", seed=1, train_images=12, test_images=6)
    split_dir = write_kind(cfg, tmp_path)
    _check_llava_json(split_dir, MULTI_ANSWERS)
    assert len(list((split_dir / "images" / "train").glob("*.png"))) == 12
    with Image.open(split_dir / "images" / "test" / "00000.png") as image:
        assert image.size == (CFG.canvas, CFG.canvas)
    stamp = (split_dir / "train.json").stat().st_mtime_ns
    write_kind(cfg, tmp_path)  # resume: nothing to do
    assert (split_dir / "train.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="remove the folder"):
        write_kind(DataConfig("multi", seed=2, train_images=12, test_images=6), tmp_path)


def test_convert_easy(tmp_path: Path) -> None:
    pytest.importorskip("easy_vqa")
    split_dir = write_kind(DataConfig("easy", limit=15), tmp_path)
    _check_llava_json(split_dir, EASY_ANSWERS)
    meta = json.loads((split_dir / "images_train.json").read_text())
    assert len(meta) == 15 and all(len(m["objects"]) == 1 for m in meta)
    with Image.open(split_dir / meta[0]["image"]) as image:
        assert image.size == (64, 64)
        assert _drawn_objects(image).keys() == {meta[0]["objects"][0]["color"]}


# ----------------------------------------------------------------------------------------------------------------------
# the small-object split


def test_small_split_answers_agree_with_the_pixels(tmp_path: Path) -> None:
    """Every small-split answer agrees with the object read back from the written image's pixels (easy-VQA's reader,
    an independent path from the generator), and the object covers 1-6 of the tower's 8 x 8 patches."""
    from eval.mini.clip import object_patches
    from eval.mini.shapes import SmallConfig

    split_dir = write_kind(DataConfig("small", train_images=30, test_images=30), tmp_path)
    by_image: dict[str, list[tuple[str, str]]] = {}
    for record in json.loads((split_dir / "test.json").read_text()):
        by_image.setdefault(record["image"], []).append((record["question"], record["answer"]))
    covered = []
    for meta in json.loads((split_dir / "images_test.json").read_text()):
        pixels = np.asarray(Image.open(split_dir / meta["image"]).convert("RGB"))
        obj = easy_object(pixels)
        assert (obj.shape, obj.color) == (meta["objects"][0]["shape"], meta["objects"][0]["color"])
        for question, answer in by_image[meta["image"]]:
            expected = easy_answer(question, obj)  # yes/no; None for "what ..." questions
            if expected is None:
                expected = obj.shape if question.startswith("what shape") else obj.color
            assert expected == answer, question
        covered.append(int(object_patches(pixels, [obj.color], 96 // 12).sum()))
        assert max(obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]) + 1 <= SmallConfig().size[1]
    assert min(covered) >= 1 and max(covered) <= 6
    answers = Counter(a for qa in by_image.values() for _, a in qa)
    assert answers["yes"] == answers["no"] == 30 and set(answers) <= set(EASY_ANSWERS)


def test_small_split_is_seeded_per_image(tmp_path: Path) -> None:
    """Image k is the same whatever else is drawn (a pure function of seed, split, index); another seed differs."""
    from eval.mini.shapes import SmallConfig, make_small_example

    first = make_small_example(0, "train", 7, SmallConfig())
    again = make_small_example(0, "train", 7, SmallConfig())
    other = make_small_example(1, "train", 7, SmallConfig())
    assert first[0] == again[0] and first[2] == again[2]
    assert np.array_equal(np.asarray(first[1]), np.asarray(again[1]))
    assert first[0] != other[0]
    with pytest.raises(ValueError, match="size"):
        SmallConfig(size=(12, 8))


def test_pair_examples_ask_about_each_object_as_drawn() -> None:
    """The multi-turn pairs: two objects of different shapes and colours, apart; each question names one object's
    shape and its answer is that object's colour, read back from the pixels (easy-VQA's reader on the image with the
    other object painted over by the background)."""
    from eval.mini.shapes import PALETTE, SmallConfig, make_pair_example

    for index in range(40):
        scene, image, questions = make_pair_example(0, "test", index, SmallConfig())
        assert len(scene) == 2 and scene[0].shape != scene[1].shape and scene[0].color != scene[1].color
        assert [q.question for q in questions] == [f"what is the color of the {o.shape}?" for o in scene]
        pixels = _pixels(image)
        colors, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        background = colors[counts.argmax()]
        for obj, other, qa in zip(scene, scene[::-1], questions, strict=True):
            alone = pixels.copy()
            alone[np.all(pixels == PALETTE[other.color], axis=-1)] = background
            read = easy_object(alone)
            assert (read.shape, read.color) == (obj.shape, obj.color) and qa.answer == read.color
        x0, y0, x1, y1 = scene[0].box
        u0, v0, u1, v1 = scene[1].box
        assert x1 < u0 or u1 < x0 or y1 < v0 or v1 < y0  # the boxes do not overlap
    assert make_pair_example(0, "test", 3, SmallConfig())[2] == make_pair_example(0, "test", 3, SmallConfig())[2]
