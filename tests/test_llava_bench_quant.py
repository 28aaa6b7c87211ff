"""8- and 4-bit weights on a CPU (bitsandbytes' CPU kernels): the builder's --load-8bit/--load-4bit with VisionZip,
and the benchmark's own quantization of a built model against the builder's load of the same weights."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.bench import BATCH, DECODE, TEXT, TINY_15
from torch import nn

from llava.bench.measure import StageClock, make_cases, make_request, request_memory, run_request
from llava.bench.quant import (
    QUANT_MODES,
    bnb_config,
    counted_weight_bytes,
    quantize_model,
    quantized_layer_bytes,
    weight_bytes,
)
from llava.bench.shapes import build_model, counted_weights
from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.builder import load_pretrained_model
from visionzip.config import VisionZipConfig

PROMPT = [1, 5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9]  # <s>, text, the image, text: ids the tiny vocabulary holds
NEW_TOKENS = 6


def _load(path: Path, mode: str | None):
    _, model, _, _ = load_pretrained_model(
        str(path), device="cpu", device_map=None, load_8bit=mode == "8bit", load_4bit=mode == "4bit"
    )  # fmt: skip
    return model


def _image(model) -> torch.Tensor:
    side = model.get_vision_tower().config.image_size
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))


def _bnb_types(model: nn.Module) -> dict[str, str]:
    return {
        name: type(module).__name__
        for name, module in model.named_modules()
        if "bitsandbytes" in type(module).__module__
    }


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_bench_quantization_equals_the_builders_load(tiny_pair: dict[str, Path], mode: str) -> None:
    """The bench quantizes a model it built; the reference is transformers' own quantizing load (the builder's flag)
    of the same checkpoint: the same layers replaced, the same bytes, the same logits."""
    path = tiny_pair["v15"]
    mine, theirs, full = _load(path, None), _load(path, mode), _load(path, None)
    names = quantize_model(mine, mode, skip=(mine.get_vision_tower(),))
    assert set(names) == set(_bnb_types(theirs)) and _bnb_types(mine) == _bnb_types(theirs)
    assert "lm_head" not in names and not any("vision_tower" in name for name in names)
    assert any(name.startswith("model.mm_projector") for name in names)  # the projector is quantized, as loaded
    assert set(_bnb_types(mine).values()) == {"Linear8bitLt" if mode == "8bit" else "Linear4bit"}
    linears = [m for n, m in full.named_modules() if n in names]
    stored = sum(m.weight.numel() for m in linears) * (1 if mode == "8bit" else 0.5)  # int8, or two 4-bit per byte
    saved = weight_bytes(full) - weight_bytes(mine)
    assert weight_bytes(mine) == weight_bytes(theirs) and saved < sum(m.weight.numel() * 4 for m in linears) - stored
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = [model(input_ids=ids, images=_image(full)).logits for model in (mine, theirs, full)]
    assert torch.equal(logits[0], logits[1])
    assert not torch.equal(logits[0], logits[2])  # the weights really are quantized


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_visionzip_on_a_quantized_model_keeping_every_token_answers_as_vanilla(
    tiny_pair: dict[str, Path], tmp_path: Path, mode: str
) -> None:  # fmt: skip
    """VisionZip keeps [CLS] among its dominant tokens, so keeping every token equals vanilla LLaVA reading
    ``cls_patch`` features: on the same quantized model, generation with VisionZip on equals generation without."""
    path = tmp_path / "cls_patch"
    shutil.copytree(tiny_pair["v15"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "mm_vision_select_feature": "cls_patch"}))
    model = _load(path, mode)
    assert _bnb_types(model)
    ids, image = torch.tensor([PROMPT]), _image(model)
    tokens = model.get_vision_tower().num_tokens
    with torch.no_grad():
        vanilla = model.generate(ids, images=image, max_new_tokens=NEW_TOKENS, do_sample=False)
        model.set_visionzip(VisionZipConfig(dominant=tokens, contextual=0))
        kept_all = model.generate(ids, images=image, max_new_tokens=NEW_TOKENS, do_sample=False)
        model.set_visionzip(VisionZipConfig(dominant=5, contextual=2))
        (features,) = model.image_features(image, None)
        compressed = model.generate(ids, images=image, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert vanilla.shape == (1, NEW_TOKENS) and torch.equal(kept_all, vanilla)
    assert features.shape[0] == 7 and compressed.shape == (1, NEW_TOKENS)  # a real budget runs on quantized weights


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="quantization must be one of"):
        bnb_config("3bit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", QUANT_MODES)
def test_quantized_bench_model_on_cuda(mode: str) -> None:
    """The GPU memory rows: the bench's quantized model on CUDA in fp16 holds fewer bytes, answers a request with
    VisionZip, and the allocator's peak is metered."""
    cuda = torch.device("cuda")
    full = build_model(TINY_15, cuda, torch.float16, "sdpa")
    quantized = build_model(TINY_15, cuda, torch.float16, "sdpa", quant=mode)
    assert quantized.weight_bytes() < full.weight_bytes()
    request = make_request(TINY_15, BATCH, TEXT, DECODE, cuda, torch.float16)
    for case in make_cases(TINY_15, [4], paths=("ours",)):
        with torch.inference_mode():
            run = run_request(quantized, case, request, StageClock(cuda))
            memory = request_memory(quantized, case, request, cuda)
        assert run.seq_len == TEXT + (4 if case.visionzip is not None else TINY_15.patches)
        assert memory["cuda_peak_extra_mib"] > 0


@pytest.mark.parametrize("mode", [None, *QUANT_MODES])
def test_weights_counted_from_shapes_equal_the_stored_ones(mode: str | None) -> None:
    """The full-shape memory column counts weights on a meta-device model; on a shape small enough to build, the
    count equals the bytes the built (and quantized) model holds."""
    shape = dataclasses.replace(
        TINY_15,
        vision=dataclasses.replace(TINY_15.vision, hidden=64, intermediate=128),
        language=dataclasses.replace(TINY_15.language, hidden=64, intermediate=128),
    )  # fmt: skip  (widths bitsandbytes' CPU 4-bit kernel takes)
    built = build_model(shape, torch.device("cpu"), torch.float32, "sdpa", quant=mode)
    assert counted_weights(shape, torch.float32, mode) == built.weight_bytes()
    full = build_model(shape, torch.device("cpu"), torch.float32, "sdpa")
    assert counted_weight_bytes(full.model, mode, torch.float32, skip=(full.tower,)) == built.weight_bytes()
    half = counted_weights(shape, torch.float16, mode)
    assert half < counted_weights(shape, torch.float32, mode)
    with pytest.raises(ValueError, match="quantization must be one of"):
        quantized_layer_bytes(64, 32, "2bit")
