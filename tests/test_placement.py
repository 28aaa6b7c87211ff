"""One placement helper for every entry point: the device strings users pass, and features moved to the LLM's device.

No GPU here: the helper is checked on strings (CUDA's presence faked for ``auto``), and the cross-device move on a
model whose text embeddings a hook puts on the ``meta`` device, as a device map would put them on another GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.builder import _load_kwargs, load_pretrained_model
from llava.model.input_builder import build_multimodal_batch
from llava.model.placement import Placement, resolve_placement
from llava.tiny import write_tiny_llava
from visionzip import VisionZipConfig

FP16, FP32 = torch.float16, torch.float32


@pytest.mark.parametrize(
    ("device", "cuda_available", "expected"),
    [
        ("cpu", True, Placement(torch.device("cpu"), None, FP32)),
        ("cuda", True, Placement(torch.device("cuda"), "auto", FP16)),
        ("cuda:0", True, Placement(torch.device("cuda:0"), {"": "cuda:0"}, FP16)),
        ("cuda:3", True, Placement(torch.device("cuda:3"), {"": "cuda:3"}, FP16)),  # accelerate launch's rank 3
        ("auto", True, Placement(torch.device("cuda"), "auto", FP16)),
        ("auto", False, Placement(torch.device("cpu"), None, FP32)),
        (None, False, Placement(torch.device("cpu"), None, FP32)),
    ],
)
def test_device_strings(device, cuda_available: bool, expected: Placement, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    assert resolve_placement(device) == expected


def test_explicit_dtype_and_device_map_win() -> None:
    assert resolve_placement("cuda:1", dtype="bf16").dtype == torch.bfloat16
    assert resolve_placement("cpu", dtype=torch.float16).dtype == FP16
    custom = {"model.embed_tokens": 0, "lm_head": 1}
    assert resolve_placement("cuda", device_map=custom).device_map is custom
    with pytest.raises(ValueError, match="device must be"):
        resolve_placement("gpu3")
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_placement("cpu", dtype="float8")


def test_builder_loads_cuda_n_in_half_precision() -> None:
    """The defect: ``cuda:N`` (every data-parallel eval process, ``run_llava --device cuda:1``) loaded float32."""
    assert _load_kwargs("cuda:1", "auto", None, False, False) == {"dtype": FP16, "device_map": {"": "cuda:1"}}
    assert _load_kwargs("cuda", "auto", None, False, False) == {"dtype": FP16, "device_map": "auto"}
    assert _load_kwargs("cpu", "auto", None, False, False) == {"dtype": FP32}


def test_batch_builder_moves_features_to_the_embeddings_device() -> None:
    """Image features made on one device are spliced into text embeddings that live on another."""
    embedding = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 2, 3]])
    feature = torch.randn(3, 4)  # on the CPU, where the tower and projector ran
    batch = build_multimodal_batch(ids, None, None, [feature], lambda t: embedding(t).to("meta"))
    assert batch.inputs_embeds.device.type == "meta" and batch.inputs_embeds.shape == (1, 6, 4)
    assert batch.attention_mask.device.type == "meta"


@pytest.mark.parametrize("next_", [False, True])
def test_model_input_step_follows_the_embeddings_device(tmp_path: Path, next_: bool) -> None:
    """The whole input step (tower, VisionZip, projector, NeXT layout with image_newline) on a split placement:
    a forward hook puts the text embeddings on ``meta``, as ``device_map="auto"`` may put them on another GPU."""
    tokenizer, model, processor, _ = load_pretrained_model(str(write_tiny_llava(tmp_path, next=next_)), device="cpu")
    side = model.get_vision_tower().config.image_size
    size = (2 * side, side) if next_ else (side, side)
    from PIL import Image

    from llava.mm_utils import process_images

    pixels = process_images([Image.new("RGB", size, (200, 40, 40))], processor, model.config)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, *tokenizer("What is it?").input_ids[1:]]])
    handle = model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.to("meta"))
    try:
        for cfg in (None, VisionZipConfig(4, 2)):
            model.set_visionzip(cfg)
            _, _, mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
                ids, None, None, None, None, pixels, [size]
            )
            assert embeds.device.type == "meta" and mask.device.type == "meta"
    finally:
        handle.remove()
