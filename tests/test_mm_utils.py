"""Image preprocessing and prompt tokenization against hand-computed cases, with a tiny local processor/tokenizer."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import (
    KeywordsStoppingCriteria,
    divide_to_patches,
    expand2square,
    get_anyres_image_grid_shape,
    get_model_name_from_path,
    load_image,
    parse_grid_pinpoints,
    process_anyres_image,
    process_images,
    resize_and_pad_image,
    select_best_resolution,
    tokenizer_image_token,
    unpad_image,
)

SIDE = 32  # tiny encoder resolution
PINPOINTS = [(32, 64), (64, 32), (64, 64)]
LLAVA_NEXT_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
VOCAB = ["<unk>", "<s>", "</s>", "USER", ":", "ASSISTANT", "describe", "the", "image", "a", "cat", "###"]
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _processor() -> CLIPImageProcessor:
    """CLIP preprocessing (resize shortest edge, centre crop, normalise) at a 32-pixel side."""
    return CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})


def _tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over VOCAB that prepends <s> like LLaMA's (or adds nothing)."""
    model = models.WordLevel(vocab={word: i for i, word in enumerate(VOCAB)}, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _ids(*words: str) -> list[int]:
    return [VOCAB.index(word) for word in words]


def _half_red_half_blue(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), RED)
    image.paste(Image.new("RGB", (width - width // 2, height), BLUE), (width // 2, 0))
    return image


# --- padding, resolution choice, crops -------------------------------------------------------------------------


def test_expand2square_centres_wide_and_tall() -> None:
    wide = expand2square(Image.new("RGB", (4, 2), RED), BLUE)
    assert wide.size == (4, 4)
    assert [wide.getpixel((0, y)) for y in range(4)] == [BLUE, RED, RED, BLUE]
    tall = expand2square(Image.new("RGB", (1, 3), RED), BLUE)
    assert tall.size == (3, 3)
    assert [tall.getpixel((x, 0)) for x in range(3)] == [BLUE, RED, BLUE]
    square = Image.new("RGB", (3, 3), RED)
    assert expand2square(square, BLUE) is square


@pytest.mark.parametrize(
    ("size", "candidates", "expected"),
    [
        # 800x600 fits 672x672 at scale 0.84 -> 672x504 = 338688 px, more than any other candidate keeps
        ((800, 600), LLAVA_NEXT_PINPOINTS, (672, 672)),
        # 1000x200: 672x672 keeps 672x134; 1008x336 keeps 1008x201 > 200000 -> capped at the original 200000
        ((1000, 200), [(672, 672), (1008, 336)], (1008, 336)),
        # both keep all 10000 px; 200x200 wastes 30000 against 70000
        ((100, 100), [(400, 200), (200, 200)], (200, 200)),
        # equal effective pixels and waste: the first listed wins
        ((100, 100), [(200, 100), (100, 200)], (200, 100)),
    ],
)
def test_select_best_resolution(
    size: tuple[int, int], candidates: list[tuple[int, int]], expected: tuple[int, int]
) -> None:
    assert select_best_resolution(size, candidates) == expected


def test_resize_and_pad_keeps_aspect_and_centres() -> None:
    padded = resize_and_pad_image(Image.new("RGB", (20, 10), WHITE), (40, 40))
    assert padded.size == (40, 40)
    # scale 2 -> 40x20 content at rows 10..29, black above and below
    assert [padded.getpixel((5, y)) for y in (0, 9, 10, 29, 30, 39)] == [(0, 0, 0), (0, 0, 0), WHITE, WHITE] + [
        (0, 0, 0)
    ] * 2


def test_divide_to_patches_raster_order() -> None:
    image = Image.new("L", (6, 4))
    image.putdata([10 * y + x for y in range(4) for x in range(6)])  # pixel value encodes its position
    crops = divide_to_patches(image, 2)
    assert len(crops) == 6
    assert [crop.getpixel((0, 0)) for crop in crops] == [0, 2, 4, 20, 22, 24]
    assert all(crop.size == (2, 2) for crop in crops)


def test_parse_grid_pinpoints_forms() -> None:
    assert parse_grid_pinpoints(str(LLAVA_NEXT_PINPOINTS)) == LLAVA_NEXT_PINPOINTS
    assert parse_grid_pinpoints([[32, 64]]) == [(32, 64)]
    assert parse_grid_pinpoints("(1x1),...,(2x2)", 32) == [(32, 32), (32, 64), (64, 32), (64, 64)]
    with pytest.raises(ValueError, match="patch_size"):
        parse_grid_pinpoints("(1x1),...,(2x2)")
    for bad in ("__import__('os').getcwd()", "[]", "[(0, 32)]", "[(1, 2, 3)]"):
        with pytest.raises(ValueError, match="grid_pinpoints"):
            parse_grid_pinpoints(bad)


def test_anyres_grid_shape() -> None:
    assert get_anyres_image_grid_shape((800, 600), LLAVA_NEXT_PINPOINTS, 336) == (2, 2)
    assert get_anyres_image_grid_shape((1000, 200), str(LLAVA_NEXT_PINPOINTS), 336) == (3, 1)
    # range form: (1..2) x (1..3) grids of 32 px; a 20x90 image fits 32x96 best
    assert get_anyres_image_grid_shape((20, 90), "(1x1),...,(2x3)", 32) == (1, 3)


# --- processor-based pipelines ---------------------------------------------------------------------------------


def test_process_anyres_image_overview_then_crops() -> None:
    image = _half_red_half_blue(60, 30)  # best fit (64, 32): two crops side by side
    pixels = process_anyres_image(image, _processor(), PINPOINTS)
    assert pixels.shape == (3, 3, SIDE, SIDE)
    red_channel = pixels[:, 0].mean(dim=(1, 2))
    assert red_channel[1] > red_channel[2]  # left crop red, right crop blue
    overview = _processor()(image.resize((SIDE, SIDE), Image.Resampling.BICUBIC), return_tensors="pt")
    torch.testing.assert_close(pixels[0], overview["pixel_values"][0])


def test_process_images_square_and_pad() -> None:
    images = [Image.new("RGB", (64, 16), WHITE), Image.new("RGB", (20, 40), WHITE)]
    square = process_images(images, _processor(), SimpleNamespace(image_aspect_ratio="square"))
    assert square.shape == (2, 3, SIDE, SIDE)
    assert process_images(images, _processor(), SimpleNamespace()).shape == (2, 3, SIDE, SIDE)
    padded = process_images(images, _processor(), SimpleNamespace(image_aspect_ratio="pad"))
    assert padded.shape == (2, 3, SIDE, SIDE)
    # padding is the processor mean, which normalises to ~0; the white content normalises to (1 - mean) / std
    processor = _processor()
    white = (1 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    assert padded[0, :, 0].abs().max() < 0.02
    torch.testing.assert_close(padded[0, :, SIDE // 2, SIDE // 2], white, atol=0.02, rtol=0)


def test_process_images_anyres_stacks_or_lists() -> None:
    same = [_half_red_half_blue(60, 30), _half_red_half_blue(62, 31)]
    cfg = SimpleNamespace(image_aspect_ratio="anyres", image_grid_pinpoints=str(PINPOINTS))
    assert process_images(same, _processor(), cfg).shape == (2, 3, 3, SIDE, SIDE)
    mixed = [_half_red_half_blue(60, 30), Image.new("RGB", (40, 40), RED)]  # 40x40 -> (64, 64): 4 crops
    cfg_max = SimpleNamespace(image_aspect_ratio="anyres_max_9", image_grid_pinpoints=PINPOINTS)
    out = process_images(mixed, _processor(), cfg_max)
    assert isinstance(out, list)
    assert [tuple(t.shape) for t in out] == [(3, 3, SIDE, SIDE), (5, 3, SIDE, SIDE)]


def test_process_images_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        process_images([Image.new("RGB", (8, 8))], _processor(), SimpleNamespace(image_aspect_ratio="stretch"))


def test_unpad_image_removes_hand_made_padding() -> None:
    # a 4x2 (w x h) image resized into an 8x8 canvas occupies rows 2..5
    wide = torch.zeros(1, 8, 8)
    wide[:, 2:6] = 1
    assert torch.equal(unpad_image(wide, (4, 2)), torch.ones(1, 4, 8))
    # a 2x4 (w x h) image in a 6x8 canvas occupies columns 1..4
    tall = torch.zeros(2, 8, 6)
    tall[..., 1:5] = 1
    assert torch.equal(unpad_image(tall, (2, 4)), torch.ones(2, 8, 4))
    square = torch.randn(3, 5, 5)
    assert torch.equal(unpad_image(square, (7, 7)), square)


def test_unpad_image_is_robust_to_float_error() -> None:
    # 704x220 on a 48x24 feature grid: exact content height 220 * 48 / 704 = 15 (floats give 14.999...),
    # padding (24 - 15) // 2 = 4 rows each side -> 16 rows kept; truncating 14.999 would keep 14.
    assert unpad_image(torch.zeros(1, 24, 48), (704, 220)).shape == (1, 16, 48)


# --- prompts ---------------------------------------------------------------------------------------------------


def test_tokenizer_image_token_single_bos() -> None:
    tokenizer = _tokenizer()
    ids = tokenizer_image_token("USER: <image>\ndescribe the image ASSISTANT:", tokenizer)
    assert ids == [1, *_ids("USER", ":"), IMAGE_TOKEN_INDEX, *_ids("describe", "the", "image", "ASSISTANT", ":")]
    two = tokenizer_image_token("<image>a<image>cat", tokenizer, return_tensors="pt")
    assert two.dtype == torch.long
    assert two.tolist() == [1, IMAGE_TOKEN_INDEX, *_ids("a"), IMAGE_TOKEN_INDEX, *_ids("cat")]
    assert tokenizer_image_token("a cat", tokenizer, image_token_index=-7) == [1, *_ids("a", "cat")]


def test_tokenizer_image_token_without_bos() -> None:
    ids = tokenizer_image_token("a <image> cat", _tokenizer(add_bos=False))
    assert ids == [*_ids("a"), IMAGE_TOKEN_INDEX, *_ids("cat")]


def test_tokenizer_image_token_rejects_unknown_tensor_type() -> None:
    with pytest.raises(ValueError, match="return_tensors"):
        tokenizer_image_token("a", _tokenizer(), return_tensors="np")


def test_get_model_name_from_path() -> None:
    assert get_model_name_from_path("liuhaotian/llava-v1.5-7b") == "llava-v1.5-7b"
    assert get_model_name_from_path("/ckpt/llava-lora/checkpoint-500/") == "llava-lora_checkpoint-500"


def test_keywords_stopping_criteria_per_row() -> None:
    tokenizer = _tokenizer()
    prompt = torch.tensor([_ids("USER", ":", "###")] * 3)  # a keyword inside the prompt must not stop
    criteria = KeywordsStoppingCriteria(["###", "a cat"], tokenizer, prompt)
    assert criteria(prompt, None).tolist() == [False, False, False]
    generated = torch.tensor([_ids("the", "###"), _ids("a", "cat"), _ids("the", "image")])
    done = criteria(torch.cat([prompt, generated], dim=1), None)
    assert done.dtype == torch.bool
    assert done.tolist() == [True, True, False]


# --- files -----------------------------------------------------------------------------------------------------


def test_load_image_converts_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (5, 3), 7).save(path)
    image = load_image(str(path))
    assert image.mode == "RGB"
    assert image.size == (5, 3)


def test_load_image_errors_name_the_path(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=re.escape(str(corrupt))):
        load_image(corrupt)
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_image(missing)


def test_load_image_url_without_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "requests", None)  # makes `import requests` raise ImportError
    with pytest.raises(ValueError, match="requests"):
        load_image("https://example.com/cat.png")
