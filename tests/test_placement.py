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
from llava.model.placement import Placement, load_placed, resolve_placement
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


class _Recorded(Exception):
    """Raised by a stand-in ``from_pretrained`` once it has recorded its keyword arguments."""


def _recording(calls: list[dict]) -> classmethod:
    """A ``from_pretrained`` that records its keyword arguments, then stops the loader (no weights are needed)."""

    def from_pretrained(cls: type, path: str, **kwargs: object) -> None:
        calls.append(kwargs)
        raise _Recorded(path)

    return classmethod(from_pretrained)


CUDA_AUTO = {"dtype": FP16, "device_map": "auto"}  # every visible GPU, as ours under device=cuda


@pytest.mark.parametrize(
    ("device", "dtype", "cuda_available", "expected"),
    [
        ("cpu", None, True, {"dtype": FP32}),
        ("cuda", None, True, CUDA_AUTO),
        ("cuda:3", None, True, {"dtype": FP16, "device_map": {"": "cuda:3"}}),
        ("auto", None, True, CUDA_AUTO),
        ("auto", None, False, {"dtype": FP32}),
        ("cuda:1", "bf16", True, {"dtype": torch.bfloat16, "device_map": {"": "cuda:1"}}),
    ],
)
def test_load_placed_reads_devices_as_the_builder(
    device: str, dtype: str | None, cuda_available: bool, expected: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' families load with the placement our LLaVA gets for the same device string (the builder's
    ``from_pretrained`` kwargs), and in eval mode."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    calls: list[dict] = []

    class Model(torch.nn.Module):
        @classmethod
        def from_pretrained(cls, path: str, **kwargs: object) -> Model:
            calls.append({"path": path, **kwargs})
            return cls()

    model = load_placed(Model, Path("ckpt"), device, dtype, attn_implementation="sdpa")
    assert isinstance(model, Model) and not model.training
    assert calls == [{"path": "ckpt", "attn_implementation": "sdpa", **expected}]
    assert _load_kwargs(device, "auto", dtype, False, False) == expected


def _hf_loaders(tmp_path: Path) -> dict[str, tuple[type, object]]:
    """Each lmms-eval loader of transformers' classes: (the class it loads, a call loading a saved config there)."""
    from transformers import LlavaNextConfig, Qwen2_5_VLConfig

    from eval.hf_runner import load_hf_model
    from eval.llava_hf_visionzip import FAMILIES as LLAVA_FAMILIES
    from eval.options import ModelOptions
    from eval.qwen_vl_visionzip import QwenOptions, load_qwen_runner
    from eval.video_runner import VideoLlavaRunner, VideoOptions
    from visionzip.hf.llava_next import VisionZipLlavaNextForConditionalGeneration
    from visionzip.hf.qwen2_vl import VisionZipQwen2_5_VLForConditionalGeneration
    from visionzip.hf.video_llava import VisionZipVideoLlavaForConditionalGeneration

    LlavaNextConfig().save_pretrained(tmp_path / "next")
    Qwen2_5_VLConfig().save_pretrained(tmp_path / "qwen")
    next_options = ModelOptions(pretrained=str(tmp_path / "next"))
    qwen_options = ModelOptions(pretrained=str(tmp_path / "qwen"))
    video_options = ModelOptions(pretrained=str(tmp_path / "video"))
    return {
        "llava_hf": (
            VisionZipLlavaNextForConditionalGeneration,
            lambda device: load_hf_model(next_options, device, LLAVA_FAMILIES, "llava_hf_visionzip"),
        ),
        "qwen": (
            VisionZipQwen2_5_VLForConditionalGeneration,
            lambda device: load_qwen_runner(qwen_options, QwenOptions(), device, "qwen2_5_vl_visionzip"),
        ),
        "video": (
            VisionZipVideoLlavaForConditionalGeneration,
            lambda device: VideoLlavaRunner.load(video_options, VideoOptions(), device),
        ),
    }


@pytest.mark.parametrize("family", ["llava_hf", "qwen", "video"])
def test_eval_loaders_of_transformers_classes_place_as_ours(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defect: these loaders passed ``device_map=device``, so ``cuda`` meant one GPU there and every visible GPU
    for our LLaVA. Now each device string gives the builder's placement and dtype default."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model_class, load = _hf_loaders(tmp_path)[family]
    calls: list[dict] = []
    monkeypatch.setattr(model_class, "from_pretrained", _recording(calls))
    for device in ("cuda", "cuda:3", "cpu"):
        with pytest.raises(_Recorded):
            load(device)
    expected = [
        {"attn_implementation": None, **_load_kwargs(d, "auto", None, False, False)} for d in ("cuda", "cuda:3", "cpu")
    ]
    assert calls == expected
    assert calls[0] == {"attn_implementation": None, **CUDA_AUTO}  # not device_map="cuda"
