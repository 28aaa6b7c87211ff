"""The "multi" split: seeded scenes of several coloured shapes, drawn on a canvas, with questions about one of them."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

# easy-VQA's palette and shapes (its color.py and shape drawing), shared by both splits so one CLIP serves both.
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
# Backgrounds are light (every channel >= this), so no background pixel equals a palette colour: every
# palette colour has a channel below it. Object pixels are therefore exactly the pixels of palette colours.
BACKGROUND_MIN = 200
SIDES: dict[str, str] = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
COUNT_ANSWERS: tuple[str, ...] = ("0", "1", "2", "3", "4", "5")
# The closed answer set of the multi split: 3 shapes, 8 colours, yes/no, counts 0-5 (19 answers).
MULTI_ANSWERS: tuple[str, ...] = (*SHAPES, *COLORS, "yes", "no", *COUNT_ANSWERS)
# Question templates; "{side}" is one of SIDES' phrases.
SHAPE_OF_COLOR: tuple[str, ...] = ("what shape is the {color} object?", "what is the {color} shape?")
COLOR_OF_SHAPE: tuple[str, ...] = ("what color is the {shape}?", "what is the color of the {shape}?")
POSITION_COLOR = "what color is the shape {side}?"
POSITION_SHAPE = "what shape is {side}?"
COUNT_SHAPE = "how many {shape}s are there?"
COUNT_ALL = "how many shapes are there?"
EXISTS = "is there a {color} {shape}?"
QUESTION_TYPES: tuple[str, ...] = (
    "shape_of_color",
    "color_of_shape",
    "position_color",
    "position_shape",
    "count_shape",
    "count_all",
    "exists",
)


@dataclass(frozen=True)
class SceneConfig:
    """How multi-split scenes are drawn; every size is in pixels of the square canvas."""

    canvas: int = 96
    min_objects: int = 2
    max_objects: int = 5
    small_size: tuple[int, int] = (7, 11)  # inclusive range of a small object's longer side
    large_size: tuple[int, int] = (14, 28)
    small_prob: float = 0.4
    margin: int = 2  # free pixels between any two objects' boxes
    position_gap: int = 12  # an object is "on the left" only if its centre is this far left of every other
    max_tries: int = 100  # placement attempts per object before the scene is redrawn

    def __post_init__(self) -> None:
        """Validate that the sizes fit together."""
        checks = {
            "2 <= min_objects <= max_objects <= len(COLORS)": 2 <= self.min_objects <= self.max_objects <= len(COLORS),
            "0 < small_size[0] <= small_size[1] < large_size[0] <= large_size[1] < canvas": (
                0 < self.small_size[0] <= self.small_size[1] < self.large_size[0] <= self.large_size[1] < self.canvas
            ),
            "0 <= small_prob <= 1": 0 <= self.small_prob <= 1,
            "margin >= 0 and position_gap >= 0": self.margin >= 0 and self.position_gap >= 0,
            "max_tries >= 1": self.max_tries >= 1,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"SceneConfig: expected {', '.join(failed)}; got {self}")


@dataclass(frozen=True)
class Shape:
    """One object: its kind, colour and inclusive pixel box (x0, y0, x1, y1)."""

    shape: str
    color: str
    box: tuple[int, int, int, int]
    small: bool = False

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) centre of the box."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def to_json(self) -> dict:
        """The object as stored in images_<split>.json."""
        return {"shape": self.shape, "color": self.color, "box": list(self.box), "small": self.small}


@dataclass(frozen=True)
class QA:
    """A question, its answer (one of MULTI_ANSWERS) and its type (one of QUESTION_TYPES)."""

    question: str
    answer: str
    qtype: str


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """The random stream of one image: independent of how many images are drawn or in which order."""
    return random.Random(f"mini-multi/{seed}/{split}/{index}")


def _box_size(rng: random.Random, shape: str, small: bool, cfg: SceneConfig) -> tuple[int, int]:
    """(width, height) of a new object; circles are round, rectangles up to 2:1, triangles a little wider."""
    lo, hi = cfg.small_size if small else cfg.large_size
    side = rng.randint(lo, hi)
    if shape == "circle":
        return side, side
    other = rng.randint(max(lo // 2, 4), side) if shape == "rectangle" else rng.randint(max(3, (side * 3) // 4), side)
    return (side, other) if rng.random() < 0.5 else (other, side)


def _overlaps(box: tuple[int, int, int, int], others: Sequence[Shape], margin: int) -> bool:
    """Whether `box`, grown by `margin` on each side, touches any other object's box."""
    x0, y0, x1, y1 = box
    return any(
        x0 - margin <= o.box[2] and o.box[0] <= x1 + margin and y0 - margin <= o.box[3] and o.box[1] <= y1 + margin
        for o in others
    )


def _place(rng: random.Random, shape: str, color: str, placed: list[Shape], cfg: SceneConfig) -> Shape | None:
    """A new non-overlapping object, or None when `max_tries` random positions all collide."""
    small = rng.random() < cfg.small_prob
    width, height = _box_size(rng, shape, small, cfg)
    for _ in range(cfg.max_tries):
        x0, y0 = rng.randint(0, cfg.canvas - width), rng.randint(0, cfg.canvas - height)
        box = (x0, y0, x0 + width - 1, y0 + height - 1)
        if not _overlaps(box, placed, cfg.margin):
            return Shape(shape, color, box, small)
    return None


def sample_scene(rng: random.Random, cfg: SceneConfig) -> list[Shape]:
    """2-5 objects of distinct colours (shapes may repeat), some small, none overlapping; redrawn until they fit."""
    while True:
        count = rng.randint(cfg.min_objects, cfg.max_objects)
        colors = rng.sample(COLORS, count)
        placed: list[Shape] = []
        for color in colors:
            obj = _place(rng, rng.choice(SHAPES), color, placed, cfg)
            if obj is None:
                break
            placed.append(obj)
        if len(placed) == count:
            return placed


def draw_scene(scene: Sequence[Shape], rng: random.Random, canvas: int) -> Image.Image:
    """An RGB image of the scene on a random light background, without anti-aliasing (exact palette colours)."""
    background = tuple(rng.randint(BACKGROUND_MIN, 255) for _ in range(3))
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        x0, y0, x1, y1 = obj.box
        fill = PALETTE[obj.color]
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "rectangle":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:  # an upright triangle: apex at the top centre, base along the bottom of the box
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return image


def caption(scene: Sequence[Shape]) -> str:
    """The objects from left to right: "a red circle, a small blue triangle and a green rectangle"."""
    ordered = sorted(scene, key=lambda obj: obj.center)
    parts = [f"a {'small ' if obj.small else ''}{obj.color} {obj.shape}" for obj in ordered]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def extreme_object(scene: Sequence[Shape], side: str, gap: float) -> Shape | None:
    """The object on `side` (left/right/top/bottom) if its centre leads every other one's by at least `gap`."""
    axis = 0 if side in ("left", "right") else 1
    sign = 1 if side in ("left", "top") else -1
    ordered = sorted(scene, key=lambda obj: sign * obj.center[axis])
    if len(ordered) < 2 or sign * (ordered[1].center[axis] - ordered[0].center[axis]) < gap:
        return None
    return ordered[0]


def _attribute_questions(rng: random.Random, scene: Sequence[Shape]) -> list[QA]:
    """The shape of an object named by colour, and the colour of a shape that occurs once."""
    obj = rng.choice(scene)
    out = [QA(rng.choice(SHAPE_OF_COLOR).format(color=obj.color), obj.shape, "shape_of_color")]
    counts = Counter(o.shape for o in scene)
    unique = [o for o in scene if counts[o.shape] == 1]
    if unique:
        obj = rng.choice(unique)
        out.append(QA(rng.choice(COLOR_OF_SHAPE).format(shape=obj.shape), obj.color, "color_of_shape"))
    return out


def _position_questions(rng: random.Random, scene: Sequence[Shape], gap: float) -> list[QA]:
    """The colour or the shape of the object on one side, if some side has an unambiguous object."""
    sides = [(side, obj) for side in SIDES if (obj := extreme_object(scene, side, gap)) is not None]
    if not sides:
        return []
    side, obj = rng.choice(sides)
    if rng.random() < 0.5:
        return [QA(POSITION_COLOR.format(side=SIDES[side]), obj.color, "position_color")]
    return [QA(POSITION_SHAPE.format(side=SIDES[side]), obj.shape, "position_shape")]


def _count_question(rng: random.Random, scene: Sequence[Shape]) -> QA:
    """How many objects of one shape (0-5), or how many objects in all (2-5)."""
    if rng.random() < 0.7:
        shape = rng.choice(SHAPES)
        count = sum(obj.shape == shape for obj in scene)
        return QA(COUNT_SHAPE.format(shape=shape), str(count), "count_shape")
    return QA(COUNT_ALL, str(len(scene)), "count_all")


def _absent_pair(rng: random.Random, scene: Sequence[Shape]) -> tuple[str, str]:
    """A (colour, shape) pair not in the scene; mostly a distractor sharing the colour or the shape of an object."""
    present = {(obj.color, obj.shape) for obj in scene}
    obj = rng.choice(scene)
    kind = rng.choice(("same_color", "same_shape", "any"))
    if kind == "same_color":
        candidates = [(obj.color, s) for s in SHAPES]
    elif kind == "same_shape":
        candidates = [(c, obj.shape) for c in COLORS]
    else:
        candidates = [(c, s) for c in COLORS for s in SHAPES]
    candidates = [pair for pair in candidates if pair not in present]
    return rng.choice(candidates)  # never empty: colours are distinct, so each colour has at most one shape


def _exists_questions(rng: random.Random, scene: Sequence[Shape]) -> list[QA]:
    """One yes and one no question "is there a <colour> <shape>?", in random order."""
    obj = rng.choice(scene)
    color, shape = _absent_pair(rng, scene)
    pair = [
        QA(EXISTS.format(color=obj.color, shape=obj.shape), "yes", "exists"),
        QA(EXISTS.format(color=color, shape=shape), "no", "exists"),
    ]
    rng.shuffle(pair)
    return pair


def scene_questions(rng: random.Random, scene: Sequence[Shape], cfg: SceneConfig) -> list[QA]:
    """About six questions per scene: attributes by colour/shape, position, a count, and a yes and a no."""
    return [
        *_attribute_questions(rng, scene),
        *_position_questions(rng, scene, cfg.position_gap),
        _count_question(rng, scene),
        *_exists_questions(rng, scene),
    ]


def make_example(seed: int, split: str, index: int, cfg: SceneConfig) -> tuple[list[Shape], Image.Image, list[QA]]:
    """Scene, image and questions of image `index` of `split`: a pure function of its arguments."""
    rng = scene_rng(seed, split, index)
    scene = sample_scene(rng, cfg)
    image = draw_scene(scene, rng, cfg.canvas)
    return scene, image, scene_questions(rng, scene, cfg)


def all_questions() -> list[str]:
    """Every question the multi split can ask (for building a tokenizer that has seen them all)."""
    sides = list(SIDES.values())
    return sorted(
        {
            *(t.format(color=c) for t in SHAPE_OF_COLOR for c in COLORS),
            *(t.format(shape=s) for t in COLOR_OF_SHAPE for s in SHAPES),
            *(t.format(side=side) for t in (POSITION_COLOR, POSITION_SHAPE) for side in sides),
            *(COUNT_SHAPE.format(shape=s) for s in SHAPES),
            COUNT_ALL,
            *(EXISTS.format(color=c, shape=s) for c in COLORS for s in SHAPES),
        }
    )


# ----------------------------------------------------------------------------------------------------------------------
# The "small" split: one small object somewhere on the canvas, asked about in easy-VQA's words. With the tiny tower's
# 12-pixel patches an object covers 1-6 of the 64 patches (3.3 on average), so k patches drawn at random often miss
# it (7 of 64: about 2 draws in 3), while the
# patches that [CLS] attends to can find it: the setting where the choice of the kept tokens decides the answer.
SMALL_SHAPE_QUESTIONS: tuple[str, ...] = ("what shape is in the image?", "what shape is present?")
SMALL_COLOR_QUESTIONS: tuple[str, ...] = ("what color is the shape?", "what is the color of the {shape}?")
SMALL_EXISTS_QUESTIONS: tuple[str, ...] = ("is there a {color} shape?", "is there a {shape}?")


@dataclass(frozen=True)
class SmallConfig:
    """How small-split images are drawn: one object whose longer side is in ``size`` pixels, on ``canvas``."""

    canvas: int = 96
    size: tuple[int, int] = (10, 15)  # on the tower's 12-px grid: 1 to 6 patches of 64 (8-12 px: the LLM missed them)

    def __post_init__(self) -> None:
        """Validate that the object fits."""
        if not 4 <= self.size[0] <= self.size[1] < self.canvas:
            raise ValueError(f"SmallConfig: expected 4 <= size[0] <= size[1] < canvas; got {self}")

    def scene(self) -> SceneConfig:
        """The scene settings that place one object of this size (every object small)."""
        large = (self.size[1] + 1, self.canvas - 1)
        return SceneConfig(canvas=self.canvas, small_size=self.size, large_size=large, small_prob=1.0)


def small_questions(rng: random.Random, obj: Shape) -> list[QA]:
    """Its shape, its colour, and one yes and one no question naming a colour or a shape, in random order."""
    out = [
        QA(rng.choice(SMALL_SHAPE_QUESTIONS), obj.shape, "shape"),
        QA(rng.choice(SMALL_COLOR_QUESTIONS).format(shape=obj.shape), obj.color, "color"),
    ]
    template = rng.choice(SMALL_EXISTS_QUESTIONS)
    if "{color}" in template:
        other = rng.choice([c for c in COLORS if c != obj.color])
        pair = [QA(template.format(color=obj.color), "yes", "yes/no"), QA(template.format(color=other), "no", "yes/no")]
    else:
        other = rng.choice([s for s in SHAPES if s != obj.shape])
        pair = [QA(template.format(shape=obj.shape), "yes", "yes/no"), QA(template.format(shape=other), "no", "yes/no")]
    rng.shuffle(pair)
    return out + pair


def make_small_example(
    seed: int, split: str, index: int, cfg: SmallConfig
) -> tuple[list[Shape], Image.Image, list[QA]]:
    """Object, image and questions of small-split image `index`: a pure function of its arguments."""
    rng = random.Random(f"mini-small/{seed}/{split}/{index}")
    scene_cfg = cfg.scene()
    obj = _place(rng, rng.choice(SHAPES), rng.choice(COLORS), [], scene_cfg)
    if obj is None:  # cannot happen on an empty canvas: the first position tried is free
        raise RuntimeError("an object could not be placed on an empty canvas")
    image = draw_scene([obj], rng, cfg.canvas)
    return [obj], image, small_questions(rng, obj)


PAIR_QUESTION = SMALL_COLOR_QUESTIONS[1]  # "what is the color of the {shape}?": names the object it asks about


def make_pair_example(seed: int, split: str, index: int, cfg: SmallConfig) -> tuple[list[Shape], Image.Image, list[QA]]:
    """Two small objects of different shapes and colours on one canvas, and one question about each, in the order
    to ask them (the multi-turn task: turn 2 asks about the other object than turn 1): the colour of each, named by
    its shape, in the small split's own words. A pure function of its arguments."""
    rng = random.Random(f"mini-pair/{seed}/{split}/{index}")
    scene_cfg = cfg.scene()
    shapes, colors = rng.sample(SHAPES, 2), rng.sample(COLORS, 2)
    placed: list[Shape] = []
    for shape, color in zip(shapes, colors, strict=True):
        obj = _place(rng, shape, color, placed, scene_cfg)
        if obj is None:  # two objects of at most 15 px on 96 px always leave room: _place tries many positions
            raise RuntimeError(f"pair example {index}: no room for a second object beside {placed}")
        placed.append(obj)
    image = draw_scene(placed, rng, cfg.canvas)
    return placed, image, [QA(PAIR_QUESTION.format(shape=o.shape), o.color, "color") for o in placed]


def all_small_questions() -> list[str]:
    """Every question the small split can ask (for the tokenizer)."""
    fills = [{"shape": s, "color": c} for s in SHAPES for c in COLORS]
    return sorted({t.format(**f) for t in (*SMALL_SHAPE_QUESTIONS, *SMALL_COLOR_QUESTIONS, *SMALL_EXISTS_QUESTIONS)
                   for f in fills})  # fmt: skip
