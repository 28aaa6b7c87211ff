"""The batched-vs-one-by-one generation check: prompts of different lengths and image counts, padded and generated."""

from __future__ import annotations

import torch
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images, tokenizer_image_token

NEW_TOKENS = 5
# (prompt, sizes of its images): different lengths, one prompt with two images, one text-only row
ROWS = [
    ("USER: <image>\nColour? ASSISTANT:", [(40, 30)]),
    ("USER: <image>\nWhat is the shape of the object in the middle of the picture, and why? ASSISTANT:", [(64, 128)]),
    ("USER: Compare <image> with <image>. Which one is larger? ASSISTANT:", [(130, 64), (200, 60)]),
    ("USER: Say hello to everyone in the room. ASSISTANT:", []),
]
COLOURS = [(220, 20, 20), (20, 20, 220), (20, 200, 20), (200, 200, 20)]


def _solid_images(processor, model, sizes: list[tuple[int, int]], first_colour: int) -> list[torch.Tensor]:
    """One (3, S, S) or (V, 3, S, S) tensor per image: plain images of the given (width, height)."""
    pictures = [Image.new("RGB", size, COLOURS[(first_colour + k) % len(COLOURS)]) for k, size in enumerate(sizes)]
    return [process_images([picture], processor, model.config)[0] for picture in pictures]


def prompt_rows(tokenizer, processor, model) -> list[tuple[torch.Tensor, list[torch.Tensor], list[tuple[int, int]]]]:
    """Per row: prompt ids (L,), its images, their sizes."""
    rows = []
    for r, (prompt, sizes) in enumerate(ROWS):
        ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        rows.append((ids, _solid_images(processor, model, sizes, r), sizes))
    return rows


def pad_rows(tokenizer, rows: list, side: str) -> dict[str, torch.Tensor]:
    """The rows' prompt ids padded by the tokenizer on ``side``: input_ids and attention_mask (B, L)."""
    return tokenizer.pad({"input_ids": [ids.tolist() for ids, _, _ in rows]}, padding_side=side, return_tensors="pt")


def generate_greedy(model, ids: torch.Tensor, mask: torch.Tensor | None, images: list, sizes: list, **kwargs):
    """Greedy ``NEW_TOKENS`` from ``ids`` (B, L) with their images, returning the sequences and the logits."""
    return model.generate(
        ids, attention_mask=mask, images=images or None, image_sizes=sizes or None, max_new_tokens=NEW_TOKENS,
        do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True, **kwargs,
    )  # fmt: skip


def check_batched_equals_single(tokenizer, model, processor, side: str, **kwargs) -> None:
    """``ROWS`` padded on ``side`` and generated as one batch give each row's tokens and first logits alone."""
    rows = prompt_rows(tokenizer, processor, model)
    padded = pad_rows(tokenizer, rows, side)
    assert len({int(n) for n in padded["attention_mask"].sum(1)}) == len(rows)  # every row a different length
    images = [image for _, row_images, _ in rows for image in row_images]
    sizes = [size for _, _, row_sizes in rows for size in row_sizes]
    batched = generate_greedy(model, padded["input_ids"], padded["attention_mask"], images, sizes, **kwargs)
    assert batched.sequences.shape == (len(rows), NEW_TOKENS)
    for r, (ids, row_images, row_sizes) in enumerate(rows):
        single = generate_greedy(model, ids[None], None, row_images, row_sizes)
        assert batched.sequences[r].tolist() == single.sequences[0].tolist(), f"row {r}"
        torch.testing.assert_close(batched.logits[0][r], single.logits[0][0], rtol=0, atol=1e-5)
