"""The benchmark's transformers path: the VisionZip subclass of transformers' LLaVA / LLaVA-NeXT class holding the
bench model's own weights (shared tensors, as ``python -m llava.convert --to-hf`` would export them)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from llava.model.hf_export import add_image_token_rows, hf_config, hf_family, rename_state_dict
from visionzip.hf.llava import VisionZipLlavaForConditionalGeneration
from visionzip.hf.llava_next import VisionZipLlavaNextForConditionalGeneration

HF_VISIONZIP_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": VisionZipLlavaForConditionalGeneration,
    "llava_next": VisionZipLlavaNextForConditionalGeneration,
}


def build_hf_twin(model: nn.Module, device: torch.device, dtype: torch.dtype, attn: str) -> PreTrainedModel:
    """transformers' VisionZip class for our random LLaVA ``model``, on ``device`` in ``dtype``, VisionZip off.

    The parameters are ``model``'s tensors (assigned, not copied), except the embedding and ``lm_head``, which gain
    one row for transformers' image token (id = our vocabulary size, the mean row, as the export writes it).
    """
    config = model.config
    family = hf_family(config)
    image_token_id = config.vocab_size
    exported = hf_config(config, model.get_vision_tower().config, family, image_token_id, image_token_id + 1)
    state = add_image_token_rows(rename_state_dict(model.state_dict()), image_token_id + 1)
    with torch.device(device):  # non-persistent buffers (rotary frequencies, position ids) are made here
        twin = HF_VISIONZIP_CLASSES[family]._from_config(exported, dtype=dtype, attn_implementation=attn)
    twin.load_state_dict(state, strict=True, assign=True)
    return twin.eval().requires_grad_(False)


def hf_inputs(input_ids: torch.Tensor, placeholder: int, image_token_id: int, count: int) -> torch.Tensor:
    """(B, L) ids with one ``placeholder`` per row -> (B, L - 1 + count) with ``count`` image tokens in its place."""
    rows = []
    for row in input_ids.tolist():
        at = row.index(placeholder)
        rows.append(row[:at] + [image_token_id] * count + row[at + 1 :])
    return torch.tensor(rows, device=input_ids.device)


def hf_image_kwargs(images: torch.Tensor, image_sizes: list[tuple[int, int]] | None) -> dict[str, Any]:
    """``pixel_values`` and, for LLaVA-NeXT, ``image_sizes`` as (B, 2) (height, width): ours are (width, height)."""
    if image_sizes is None:
        return {"pixel_values": images}
    sizes = torch.tensor([[height, width] for width, height in image_sizes], device=images.device)
    return {"pixel_values": images, "image_sizes": sizes}
