"""LLaVA shapes for the benchmark (CLIP ViT-L/14-336 + Vicuna), their scaled CPU stand-ins, and the models built."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, PreTrainedModel

from llava.bench.hf import build_hf_twin
from llava.bench.quant import counted_weight_bytes, quantize_model, weight_bytes
from llava.bench.text_tower import write_text_tower
from llava.model.config import LlavaConfig
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
from llava.model.selection import text_relevance
from llava.model.vision_tower import CLIPVisionTower
from visionzip import Captured
from visionzip.baselines.select import SelectionConfig, needs_text
from visionzip.bench import CLIP_L_336, EncoderShape, released_capture
from visionzip.config import VisionZipConfig


@dataclass(frozen=True)
class LanguageShape:
    """A Llama-family decoder's shape (Vicuna); random weights, since timing does not depend on values."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class LlavaShape:
    """A LLaVA: encoder, projector, language model, and the AnyRes crop grid (None: one view, LLaVA-1.5).

    ``budgets`` are the paper's VisionZip totals per image (visual tokens into the LLM), split evenly over
    the views: LLaVA-NeXT's 640 is 5 x (108 + 20).
    """

    name: str
    vision: EncoderShape
    language: LanguageShape
    budgets: tuple[int, ...]
    select_layer: int = -2
    projector_depth: int = 2  # mlp2x_gelu
    anyres_grid: tuple[int, int] | None = None  # (crops across, crops down)

    @property
    def side(self) -> int:
        """Patches per side of one view."""
        return self.vision.image_size // self.vision.patch_size

    @property
    def patches(self) -> int:
        """Patch tokens per view, P ([CLS] not counted)."""
        return self.side**2

    @property
    def views(self) -> int:
        """Views per image: 1, or the base view plus the AnyRes crops."""
        return 1 if self.anyres_grid is None else 1 + self.anyres_grid[0] * self.anyres_grid[1]

    @property
    def full_budget(self) -> int:
        """The paper's uncompressed count: P per view (LLaVA-1.5 576, LLaVA-NeXT 2880)."""
        return self.views * self.patches

    @property
    def image_hw(self) -> tuple[int, int]:
        """(width, height) in pixels of the benchmark image: exactly the AnyRes grid, so nothing is padded."""
        across, down = self.anyres_grid or (1, 1)
        return across * self.vision.image_size, down * self.vision.image_size


VICUNA_MAX_POSITIONS = 4096  # Vicuna v1.5, the LLM of LLaVA-1.5 and LLaVA-1.6-Vicuna
VICUNA_VOCAB = 32000
VICUNA_7B = LanguageShape(4096, 32, 32, 32, 11008, VICUNA_VOCAB, VICUNA_MAX_POSITIONS)
VICUNA_13B = LanguageShape(5120, 40, 40, 40, 13824, VICUNA_VOCAB, VICUNA_MAX_POSITIONS)
LLAVA15_BUDGETS = (192, 128, 64)  # 162+30, 108+20, 54+10
NEXT_BUDGETS = (640, 320, 160)  # 5 views x (108+20, 54+10, 27+5)
NEXT_GRID = (2, 2)  # a 672 x 672 image: base view + 4 crops

PRESETS: dict[str, LlavaShape] = {
    "llava-1.5-7b": LlavaShape("llava-1.5-7b", CLIP_L_336, VICUNA_7B, LLAVA15_BUDGETS),
    "llava-1.5-13b": LlavaShape("llava-1.5-13b", CLIP_L_336, VICUNA_13B, LLAVA15_BUDGETS),
    "llava-next-7b": LlavaShape("llava-next-7b", CLIP_L_336, VICUNA_7B, NEXT_BUDGETS, anyres_grid=NEXT_GRID),
    "llava-next-13b": LlavaShape("llava-next-13b", CLIP_L_336, VICUNA_13B, NEXT_BUDGETS, anyres_grid=NEXT_GRID),
}


def _scaled_count(value: int, scale: float, least: int = 1) -> int:
    return max(least, round(value * scale))


def scale_shape(shape: LlavaShape, scale: float, depth: bool = True) -> LlavaShape:
    """Shrink widths and depths by ``scale``, keeping every token count (image, patch, text) unchanged.

    Heads scale and the head width stays (64 for CLIP, 128 for Vicuna), so widths are heads x head width;
    MLP widths keep their ratio to the width; layer counts scale (at least ``-select_layer``, so the
    select layer exists). The vocabulary is kept: only one position's logits are computed per step.
    Linear layers' FLOPs shrink about ``scale^3``, attention's ``scale^2``, in the encoder and the LLM alike.
    ``depth=False`` keeps every layer count (FLOPs shrink ``scale^2`` and ``scale``): the methods that prune inside
    the language model name layers of the real depth (FastV's K=2, PDrop's 2/8/16, SparseVLM's 2/6/15/19).
    """
    if scale == 1:
        return shape
    if not 0 < scale <= 1:
        raise ValueError(f"--scale must be in (0, 1], got {scale}")
    v, lm = shape.vision, shape.language
    v_heads, lm_heads = _scaled_count(v.heads, scale), _scaled_count(lm.heads, scale)
    v_hidden, lm_hidden = v_heads * (v.hidden // v.heads), lm_heads * lm.head_dim
    depth_scale = scale if depth else 1.0
    vision = replace(
        v, hidden=v_hidden, heads=v_heads, layers=_scaled_count(v.layers, depth_scale, -shape.select_layer),
        intermediate=round(v.intermediate * v_hidden / v.hidden),
    )  # fmt: skip
    language = replace(
        lm, hidden=lm_hidden, heads=lm_heads, kv_heads=max(1, lm_heads * lm.kv_heads // lm.heads),
        layers=_scaled_count(lm.layers, depth_scale), intermediate=round(lm.intermediate * lm_hidden / lm.hidden),
    )  # fmt: skip
    name = f"{shape.name}@{scale:g}" + ("" if depth else " (all layers)")
    return replace(shape, name=name, vision=vision, language=language)


def view_config(shape: LlavaShape, budget: int) -> VisionZipConfig:
    """The per-view VisionZip split of a total per-image budget (the paper's: 64 = 54+10; NeXT 160 = 5 x (27+5))."""
    if budget % shape.views:
        raise ValueError(f"budget {budget} is not a multiple of {shape.name}'s {shape.views} views")
    cfg = VisionZipConfig.from_budget(budget // shape.views, layer=shape.select_layer)
    cfg.check_fits(shape.patches + 1)
    return cfg


def visual_tokens(shape: LlavaShape, cfg: VisionZipConfig | SelectionConfig | None) -> int:
    """Visual tokens per image the LLM receives (closed form of LLaVA's layouts).

    LLaVA-1.5: P. LLaVA-NeXT (``spatial_unpad``, an unpadded image): base view P, the stitched crop grid
    (down x side) x (across x side), and one ``image_newline`` per grid row (2928 for 672 x 672, not the paper's
    2880). VisionZip: views x (dominant + contextual), no newlines (the released layout); a selection the same,
    views x its tokens per view.
    """
    if cfg is not None:
        return shape.views * cfg.tokens
    if shape.anyres_grid is None:
        return shape.patches
    across, down = shape.anyres_grid
    rows = down * shape.side
    return shape.patches + rows * across * shape.side + rows


def _llava_config(shape: LlavaShape, clip_dir: str) -> LlavaConfig:
    lm, anyres = shape.language, shape.anyres_grid is not None
    return LlavaConfig(
        vocab_size=lm.vocab, hidden_size=lm.hidden, intermediate_size=lm.intermediate,
        num_hidden_layers=lm.layers, num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads,
        max_position_embeddings=lm.max_positions, tie_word_embeddings=False,
        mm_vision_tower=clip_dir, mm_hidden_size=shape.vision.hidden, mm_vision_select_layer=shape.select_layer,
        mm_projector_type="linear" if shape.projector_depth == 1 else f"mlp{shape.projector_depth}x_gelu",
        mm_patch_merge_type="spatial_unpad" if anyres else "flat", image_aspect_ratio="anyres" if anyres else "pad",
        image_grid_pinpoints=[list(shape.image_hw)] if anyres else None,
    )  # fmt: skip


@contextmanager
def _clip_dir(shape: EncoderShape, text: bool = False) -> Iterator[str]:
    """A folder holding the encoder's ``config.json``: the tower reads its config from a name, as in LLaVA.
    ``text``: a full CLIP checkpoint instead, whose text tower CDPruner loads (:mod:`llava.bench.text_tower`)."""
    config = CLIPVisionConfig(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate, image_size=shape.image_size, patch_size=shape.patch_size,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="llava-bench-clip-") as folder:
        config.save_pretrained(folder)
        if text:
            write_text_tower(Path(folder), shape)
        yield folder


class ReleasedVisionTower(CLIPVisionTower):
    """Our tower with the released VisionZip code's encoder: eager attention, every layer's map and hidden state
    returned (``output_attentions=True, output_hidden_states=True``), all layers run, then compression."""

    def capture_visionzip(self, pixels: torch.Tensor, cfg: VisionZipConfig) -> Captured:
        """The released encoder run in place of ours; the compression after it is the same."""
        return released_capture(self.vision_tower, pixels, cfg)


@dataclass
class BenchModel:
    """A random LLaVA of a shape, an eager copy of its tower for the released path, and (for the transformers path)
    transformers' VisionZip LLaVA class holding the same weights; None when that path is not run."""

    shape: LlavaShape
    model: LlavaLlamaForCausalLM
    tower: CLIPVisionTower
    released_tower: ReleasedVisionTower
    hf: PreTrainedModel | None = None
    quant: str | None = None  # the language model's and projector's weights in 8 or 4 bits (llava.bench.quant)

    def weight_bytes(self, selection: SelectionConfig | None = None) -> int:
        """The model's weights as stored (the released path's eager tower copy not counted); with CDPruner's
        ``selection``, also its CLIP text tower and image projection, held beside the model."""
        total = weight_bytes(self.model)
        if selection is not None and needs_text(selection):
            relevance = text_relevance(self.model)
            total += weight_bytes(relevance.text) + relevance.projection.numel() * relevance.projection.element_size()
        return total


def build_model(
    shape: LlavaShape, device: torch.device, dtype: torch.dtype, attn: str, hf: bool = False, text: bool = False,
    quant: str | None = None,
) -> BenchModel:  # fmt: skip
    """A ``LlavaLlamaForCausalLM`` with random weights (seed 0), built on ``device`` in ``dtype``.

    ``attn`` is the attention implementation of the LLM and of the tower (vanilla, ours and transformers'); the
    released path's tower is always eager, as the released code forces it. ``hf``: also build transformers' class
    on the same weights (:func:`llava.bench.hf.build_hf_twin`). ``text``: load CLIP's text tower for CDPruner (random,
    CLIP-L's shape scaled as the vision tower). ``quant``: then quantize the language model and projector ("8bit",
    "4bit"; :func:`llava.bench.quant.quantize_model`), as the builder's ``--load-8bit/--load-4bit`` would.
    """
    torch.manual_seed(0)
    with _clip_dir(shape.vision, text) as clip_dir, torch.device(device):
        config = _llava_config(shape, clip_dir)
        model = LlavaLlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)
        tower = model.get_vision_tower()
        released = ReleasedVisionTower(clip_dir, shape.select_layer, tower.select_feature, "eager")
        if text:  # loaded now, while the folder exists; held by the model outside its state dict
            text_relevance(model)
    released.vision_tower.to(device=device, dtype=dtype).load_state_dict(tower.vision_tower.state_dict())
    for module in (model, released):
        module.eval().requires_grad_(False)
    if released.vision_tower.config._attn_implementation != "eager":
        raise ValueError("the released path's tower must use eager attention")
    twin = build_hf_twin(model, device, dtype, attn) if hf else None
    if quant is not None:
        quantize_model(model, quant, skip=(tower,))
    return BenchModel(shape, model, tower, released, twin, quant)


def counted_weights(shape: LlavaShape, dtype: torch.dtype, quant: str | None = None) -> int:
    """Bytes of ``shape``'s weights in ``dtype``, quantized with ``quant`` as the bench quantizes, counted on a model
    built on the ``meta`` device (nothing allocated: the real sizes of a full-size LLaVA on any machine)."""
    with _clip_dir(shape.vision) as clip_dir, torch.device("meta"):
        model = LlavaLlamaForCausalLM._from_config(_llava_config(shape, clip_dir), dtype=dtype)
    return counted_weight_bytes(model, quant, dtype, skip=(model.get_vision_tower(),))


@contextmanager
def use_tower(bench: BenchModel, tower: CLIPVisionTower) -> Iterator[None]:
    """Put ``tower`` in the model for the block (our own model instance; restored on exit, also on error)."""
    inner = bench.model.get_model()
    original = inner.vision_tower
    inner.vision_tower = tower
    try:
        yield
    finally:
        inner.vision_tower = original
