"""encode(): captured attention on SDPA/eager equals the eager attention-map path; hooks are local and removed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.visionzip_reference import eager_reference, reference_content_seed
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from visionzip import VisionZipConfig, encode, run_to_layer
from visionzip.capture import capture_outputs, received_scores

IMPLEMENTATIONS = ["eager", "sdpa"]


def _save_tiny(model_cls, config_cls, path: Path) -> Path:
    config = config_cls(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=24, patch_size=4
    )
    torch.manual_seed(0)
    model_cls(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(CLIPVisionModel, CLIPVisionConfig, tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(SiglipVisionModel, SiglipVisionConfig, tmp_path_factory.mktemp("siglip"))


def _load(cls, path: Path, impl: str, dtype: torch.dtype = torch.float32):
    return cls.from_pretrained(path, attn_implementation=impl, dtype=dtype).eval()


def _pixels(batch: int = 3, size: int = 24) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("dominant", "contextual", "layer", "score_layer"),
    [(10, 4, -2, None), (1, 5, -1, None), (30, 0, 0, None), (20, 17, -2, None), (10, 4, -2, 0), (10, 4, 0, -1)],
)
def test_clip_matches_eager_attention_maps(
    clip_dir: Path, impl: str, dominant: int, contextual: int, layer: int, score_layer: int | None
):
    cfg = VisionZipConfig(dominant=dominant, contextual=contextual, layer=layer, score_layer=score_layer)
    pixels = _pixels()
    with torch.no_grad():
        (ref_tokens, ref_keep), _ = eager_reference(_load(CLIPVisionModel, clip_dir, "eager"), pixels, cfg)
        out = encode(_load(CLIPVisionModel, clip_dir, impl), pixels, cfg)
    assert out.keep_indices.tolist() == ref_keep
    assert out.tokens.shape == (3, dominant + contextual, 32) and out.num_input_tokens == 37
    torch.testing.assert_close(out.tokens, ref_tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_siglip_received_attention_matches_eager(siglip_dir: Path, impl: str, chunk: int):
    cfg = VisionZipConfig(dominant=9, contextual=4, cls_token=False, query_chunk=chunk)
    pixels = _pixels(2)
    with torch.no_grad():
        (ref_tokens, ref_keep), _ = eager_reference(_load(SiglipVisionModel, siglip_dir, "eager"), pixels, cfg)
        out = encode(_load(SiglipVisionModel, siglip_dir, impl), pixels, cfg)
    assert out.keep_indices.tolist() == ref_keep
    torch.testing.assert_close(out.tokens, ref_tokens, rtol=1e-5, atol=1e-5)


def test_received_scores_equal_full_map_mean() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 11, 12, generator=gen), torch.randn(2, 11, 12, generator=gen)
    full = ((q.view(2, 11, 3, 4).transpose(1, 2) @ k.view(2, 11, 3, 4).permute(0, 2, 3, 1)) * 0.5).softmax(-1)
    torch.testing.assert_close(received_scores(q, k, 3, 0.5, chunk=4), full.mean(dim=(1, 2)))


def test_run_to_layer_is_llava_select_layer(clip_dir: Path) -> None:
    model, pixels = _load(CLIPVisionModel, clip_dir, "sdpa"), _pixels()
    with torch.no_grad():
        full = model(pixels, output_hidden_states=True).hidden_states
        for layer in (-2, -1, 0):
            torch.testing.assert_close(run_to_layer(model, pixels, layer), full[layer if layer < 0 else layer + 1])


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_and_second_model_untouched(clip_dir: Path) -> None:
    ours, other = _load(CLIPVisionModel, clip_dir, "sdpa"), _load(CLIPVisionModel, clip_dir, "sdpa")
    pixels = _pixels()
    with torch.no_grad():
        # the reference: the same weights with eager attention, run before encode() could have changed anything
        before = _load(CLIPVisionModel, clip_dir, "eager")(pixels).last_hidden_state
        encode(ours, pixels, VisionZipConfig(5, 2))
        after = other(pixels).last_hidden_state
    assert _hook_count(ours) == 0 and _hook_count(other) == 0
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="larger than the 37 tokens"):
        encode(ours, pixels, VisionZipConfig(38, 0))
    assert _hook_count(ours) == 0


def test_capture_removes_hooks_on_error() -> None:
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="boom"), capture_outputs(a=layer) as seen:
        layer(torch.zeros(1, 2))
        assert "a" in seen
        raise RuntimeError("boom")
    assert len(layer._forward_hooks) == 0


def test_low_precision_model_same_indices_unless_near_tie(clip_dir: Path) -> None:
    cfg, pixels = VisionZipConfig(12, 4), _pixels()
    with torch.no_grad():
        out32 = encode(_load(CLIPVisionModel, clip_dir, "sdpa"), pixels, cfg)
        (_, _), attn = eager_reference(_load(CLIPVisionModel, clip_dir, "eager"), pixels, cfg)
        out16 = encode(_load(CLIPVisionModel, clip_dir, "sdpa", torch.bfloat16), pixels.bfloat16(), cfg)
    assert out16.tokens.dtype == torch.bfloat16
    scores = attn[:, :, 0, 1:].sum(dim=1)  # (B, N-1) fp32 scores of the patches
    for b in range(pixels.shape[0]):
        differ = set(out32.keep_indices[b].tolist()) ^ set(out16.keep_indices[b].tolist())
        cutoff = scores[b].topk(cfg.dominant - 1).values[-1]
        # a token may switch sides only if its fp32 score is within bf16 rounding of the cut-off
        assert all(abs(scores[b, i - 1] - cutoff) < 2e-2 for i in differ), differ


def test_random_selection_is_per_image_in_any_batch(clip_dir: Path) -> None:
    model = _load(CLIPVisionModel, clip_dir, "sdpa")
    pixels = _pixels(7)  # image 0, and six others as batch mates
    cfg = VisionZipConfig(dominant=10, contextual=4, selection="random")
    with torch.no_grad():
        alone = encode(model, pixels[:1], cfg)
        batches = {(0, 1, 2, 3): 0, (1, 2, 3, 0): 3, (4, 5, 6, 0): 3}
        for rows, position in batches.items():
            out = encode(model, pixels[list(rows)], cfg)
            assert out.keep_indices[position].tolist() == alone.keep_indices[0].tolist(), rows
            torch.testing.assert_close(out.tokens[position], alone.tokens[0], rtol=1e-5, atol=1e-5)
        # the draw is seeded by the pixels, not by the features: another image, or another seed, draws anew
        reseeded = encode(model, pixels[:1], VisionZipConfig(dominant=10, contextual=4, selection="random", seed=1))
        other = encode(model, pixels[1:2], cfg)
    seed = reference_content_seed(pixels[0], 0)
    draw = torch.rand(alone.num_input_tokens, generator=torch.Generator().manual_seed(seed))
    expected = sorted([0, *(draw[1:].topk(9).indices + 1).tolist()])  # [CLS], then the 9 highest draws
    assert alone.keep_indices[0].tolist() == expected
    assert reseeded.keep_indices[0].tolist() != expected
    assert other.keep_indices[0].tolist() != expected


def test_errors(clip_dir: Path, siglip_dir: Path) -> None:
    model = _load(CLIPVisionModel, clip_dir, "sdpa")
    with pytest.raises(ValueError, match="layer=5 is out of range for an encoder of 3 layers"):
        encode(model, _pixels(), VisionZipConfig(5, 2, layer=5))
    with pytest.raises(ValueError, match="pixel_values must be"):
        encode(model, torch.zeros(3, 24, 24), VisionZipConfig(5, 2))
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        encode(_load(SiglipVisionModel, siglip_dir, "sdpa"), _pixels(), VisionZipConfig(5, 2))
    with pytest.raises(ValueError, match="no VisionZip adapter for Linear"):
        encode(torch.nn.Linear(2, 2), _pixels(), VisionZipConfig(5, 2))
    with pytest.raises(ValueError, match="contextual=30 is larger than the 27 tokens left"):
        encode(model, _pixels(), VisionZipConfig(10, 30))


def test_encoders_are_matched_by_class_not_by_name(clip_dir: Path) -> None:
    """A foreign class named ``CLIPVisionModel`` (vLLM's tower is one) gets a clear error, not transformers' adapter;
    subclasses of transformers' classes, and the classes that hold one as ``vision_model``, still match."""
    model = _load(CLIPVisionModel, clip_dir, "sdpa")
    cfg, pixels = VisionZipConfig(10, 4), _pixels()

    def hold(self: torch.nn.Module, inner: torch.nn.Module) -> None:
        torch.nn.Module.__init__(self)
        self.embeddings, self.encoder = inner.embeddings, inner.encoder  # even the same attributes

    # the same name as transformers' class (vLLM's tower), another class
    foreign = type("CLIPVisionModel", (torch.nn.Module,), {"__init__": hold})(model)
    with pytest.raises(ValueError, match=r"no VisionZip adapter for CLIPVisionModel \(from .*test_visionzip_encode\)"):
        encode(foreign, pixels, cfg)

    class Subclass(type(model)):
        pass

    projected = CLIPVisionModelWithProjection(model.config).eval()
    projected.vision_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = encode(model, pixels, cfg)
        for other in (Subclass.from_pretrained(clip_dir, attn_implementation="sdpa").eval(), projected):
            out = encode(other, pixels, cfg)
            assert torch.equal(out.keep_indices, expected.keep_indices)
            torch.testing.assert_close(out.tokens, expected.tokens, rtol=1e-5, atol=1e-6)
