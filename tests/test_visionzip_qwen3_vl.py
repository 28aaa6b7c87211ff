"""VisionZip subclasses of transformers' Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE against independent references.

Tiny random checkpoints (``helpers/qwen3_tiny.py``: vision patch 4, 2x2 merge, 3 blocks, DeepStack after blocks 0
and 1 on Qwen3-VL; LLM 4 layers, Qwen3.5's hybrid) saved with ``save_pretrained`` in tmp_path. References: the last
block's attention maps from transformers' eager attention on queries and keys recomputed from the block's input; the
loop restatement of the method (``helpers/visionzip_reference.py``) applied to the main features and to every
DeepStack level on its own; the parent's ``get_rope_index`` on the vanilla sequence; the parents' logits (fed by hand
the reference features and positions); a recomputation without cache; one-by-one runs.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.qwen3_tiny import DEEPSTACK, MERGE, PATCH, TEMPORAL, write_tiny_qwen3
from helpers.visionzip_reference import reference_compress
from PIL import Image
from transformers import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.models.qwen3_vl import modeling_qwen3_vl

from visionzip.hf.qwen3_vl import (
    QwenVisionZipConfig,
    VisionZipQwen3_5ForConditionalGeneration,
    VisionZipQwen3_5MoeForConditionalGeneration,
    VisionZipQwen3VLForConditionalGeneration,
    VisionZipQwen3VLMoeForConditionalGeneration,
    VisionZipQwen3VLProcessor,
)

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPTS = [f"hi {IMAGE} and {IMAGE} what colour is it", f"a {IMAGE} b"]
SIZES = [(32, 48), (64, 32), (40, 40)]  # (height, width): 8x12, 16x8, 10x10 patches
CFG = QwenVisionZipConfig(0.45, 0.05)  # the paper's 50%
FAMILIES = {
    "qwen3_vl": (Qwen3VLForConditionalGeneration, VisionZipQwen3VLForConditionalGeneration),
    "qwen3_vl_moe": (Qwen3VLMoeForConditionalGeneration, VisionZipQwen3VLMoeForConditionalGeneration),
    "qwen3_5": (Qwen3_5ForConditionalGeneration, VisionZipQwen3_5ForConditionalGeneration),
    "qwen3_5_moe": (Qwen3_5MoeForConditionalGeneration, VisionZipQwen3_5MoeForConditionalGeneration),
}
DENSE = ["qwen3_vl", "qwen3_5"]  # the families of the longer checks (the MoE variants share their vision side)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    families = {name: (plain, VisionZipQwen3VLProcessor) for name, (plain, _) in FAMILIES.items()}
    return write_tiny_qwen3(tmp_path_factory.mktemp("hf_qwen3"), families)


@pytest.fixture(scope="module")
def loaded(checkpoints: dict[str, Path]) -> dict[str, tuple]:
    """(plain model, VisionZip model with CFG, VisionZip processor with CFG) per family, loaded once."""
    out = {}
    for family, (plain_cls, ours_cls) in FAMILIES.items():
        plain = plain_cls.from_pretrained(checkpoints[family]).eval()
        ours = ours_cls.from_pretrained(checkpoints[family], visionzip=CFG).eval()
        out[family] = (plain, ours, VisionZipQwen3VLProcessor.from_pretrained(checkpoints[family], visionzip=CFG))
    return out


def _images(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    draws = [np.random.default_rng([h, w]).integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    return [Image.fromarray(pixels) for pixels in draws]


def _inputs(processor, cfg: QwenVisionZipConfig | None, prompts: list[str], sizes: list[tuple[int, int]]):
    processor.visionzip = None if cfg is None else cfg.to_dict()
    return processor(images=_images(sizes), text=prompts, return_tensors="pt", padding=True)


# --- the independent reference: eager scores, loop compression per level, the parent's positions -------------------


def _eager_scores(model, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged-token scores (sum M,) and head-mean keys (sum M, Dh) from eager attention maps of the last block, whose
    input is taken by a pre-hook on the *plain* model's tower (no window order on Qwen3: raster, 2x2 blocks)."""
    attn, seen = model.model.visual.blocks[-1].attn, {}

    def keep(_m, args, kwargs) -> None:
        seen.update(hidden=args[0], cu_seqlens=kwargs["cu_seqlens"], rotary=kwargs["position_embeddings"])

    handle = attn.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        model.model.visual(pixels, grid_thw=grid)
    finally:
        handle.remove()
    s = seen["hidden"].shape[0]
    q, k, v = attn.qkv(seen["hidden"]).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, Dh)
    q, k = modeling_qwen3_vl.apply_rotary_pos_emb_vision(q, k, *seen["rotary"])
    received = []
    for start, end in itertools.pairwise(seen["cu_seqlens"].tolist()):
        segment = [x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]  # (1, H, L, Dh)
        _, weights = modeling_qwen3_vl.eager_attention_forward(attn, *segment, None, attn.scaling)  # (1, H, L, L)
        received.append(weights[0].float().mean(dim=0).sum(dim=0))
    scores = torch.cat(received).view(-1, MERGE * MERGE).mean(dim=1)
    keys = k.float().mean(dim=1).view(-1, MERGE * MERGE, k.shape[-1]).mean(dim=1)
    return scores, keys


def _reference_features(plain, pixels: torch.Tensor, grid: torch.Tensor, cfg: QwenVisionZipConfig) -> dict:
    """Per image: the loop method on the main features and on each DeepStack level separately, and the sources
    (dominant positions, then the contextual targets restated from the released code: every ``step``-th left)."""
    vanilla = plain.model.get_image_features(pixels, grid)
    scores, keys = _eager_scores(plain, pixels, grid)
    sizes = [int(t * h * w) // MERGE**2 for t, h, w in grid.tolist()]
    levels = [vanilla.pooler_output, *(getattr(vanilla, "deepstack_features", None) or [])]
    out = {"levels": [[] for _ in levels], "sources": []}
    for i, (score, key) in enumerate(zip(scores.split(sizes), keys.split(sizes), strict=True)):
        seg = cfg.segment_config(sizes[i])
        for level, features in enumerate(levels):
            tokens, keep = reference_compress(features[i][None], score[None], key[None], seg)
            out["levels"][level].append(tokens[0])
        rest = [j for j in range(sizes[i]) if j not in keep[0]]
        targets = rest[:: max(1, len(rest) // seg.contextual)][: seg.contextual] if seg.contextual else []
        out["sources"].append(torch.tensor(keep[0] + targets))
    return out


def _reference_positions(plain, vanilla: dict, pruned: dict, sources: list[torch.Tensor]) -> torch.Tensor:
    """(3, B, L) positions of the pruned rows: the parent's vanilla positions, image runs indexed by the sources."""
    reference, _ = plain.model.get_rope_index(
        vanilla["input_ids"], vanilla["mm_token_type_ids"], vanilla["image_grid_thw"],
        attention_mask=vanilla["attention_mask"],
    )  # fmt: skip
    positions = torch.zeros(3, *pruned["input_ids"].shape, dtype=torch.long)
    items = iter(sources)
    for row in range(pruned["input_ids"].shape[0]):
        real = vanilla["attention_mask"][row].bool()
        types, row_positions = vanilla["mm_token_type_ids"][row][real].tolist(), reference[:, row, real]
        index, start = [], 0
        for kind, run in itertools.groupby(types):
            count = len(list(run))
            index += list(range(start, start + count)) if kind == 0 else (start + next(items)).tolist()
            start += count
        kept = pruned["attention_mask"][row].bool()
        assert len(index) == int(kept.sum())
        positions[:, row, kept] = row_positions[:, index]
    return positions


def _encoder_output(family: str, levels: list[list[torch.Tensor]]):
    if family.startswith("qwen3_vl"):
        return modeling_qwen3_vl.BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(levels[0]), deepstack_features=[tuple(level) for level in levels[1:]]
        )
    return SimpleNamespace(pooler_output=tuple(levels[0]))


# --- identity, the reference, DeepStack --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_off_is_the_parent_and_keeping_everything_gives_its_logits(family: str, loaded: dict) -> None:
    plain, ours, processor = loaded[family]
    vanilla = _inputs(processor, None, PROMPTS, SIZES)
    everything = QwenVisionZipConfig.from_retention(1.0)
    assert torch.equal(_inputs(processor, everything, PROMPTS, SIZES)["input_ids"], vanilla["input_ids"])
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad():
        expected, expected_tokens = plain(**vanilla).logits, plain.generate(**vanilla, **gen)
        try:
            for cfg in (None, everything):
                ours.set_visionzip(cfg)
                assert torch.equal(ours(**vanilla).logits, expected)
                assert torch.equal(ours.generate(**vanilla, **gen), expected_tokens)
        finally:
            ours.set_visionzip(CFG)


@pytest.mark.parametrize("family", FAMILIES)
def test_parent_fed_the_reference_features_and_positions_gives_the_same_logits(family: str, loaded: dict) -> None:
    """With a budget: the parent, given by hand the loop-compressed main and DeepStack features and the parent's own
    vanilla positions at the kept tokens' sources, gives our logits; DeepStack in the wrong order does not."""
    plain, ours, processor = loaded[family]
    vanilla, pruned = _inputs(processor, None, PROMPTS, SIZES), _inputs(processor, CFG, PROMPTS, SIZES)
    with torch.no_grad():
        ref = _reference_features(plain, pruned["pixel_values"], pruned["image_grid_thw"], CFG)
        ours_features = ours.model.get_image_features(pruned["pixel_values"], pruned["image_grid_thw"])
        for i, sources in enumerate(ref["sources"]):
            assert torch.equal(ours_features.token_sources[i], sources)
        positions = _reference_positions(plain, vanilla, pruned, ref["sources"])
        by_hand = {k: pruned[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        expected = plain(**by_hand, position_ids=positions, mm_encoder_outputs={
            "image": _encoder_output(family, ref["levels"])}).logits  # fmt: skip
        got = ours(**pruned).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        if family.startswith("qwen3_vl"):
            assert len(ours_features.deepstack_features) == len(DEEPSTACK)
            for level, features in zip(ref["levels"][1:], ours_features.deepstack_features, strict=True):
                for mine, theirs in zip(features, level, strict=True):
                    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
            shuffled = [ref["levels"][0]] + [[f.flip(0) for f in level] for level in ref["levels"][1:]]
            wrong = plain(**by_hand, position_ids=positions, mm_encoder_outputs={
                "image": _encoder_output(family, shuffled)}).logits  # fmt: skip
            assert (wrong - expected).abs().max() > 1e-3  # the DeepStack levels reach the logits


def test_scores_follow_the_last_block_with_any_attention_implementation(checkpoints: dict[str, Path]) -> None:
    """Eager attention in every block gives the SDPA tower's selection: the scores are computed by us, chunked."""
    inputs = _inputs(VisionZipQwen3VLProcessor.from_pretrained(checkpoints["qwen3_vl"]), CFG, PROMPTS, SIZES)
    outs = {}
    for attn in ("sdpa", "eager"):
        model = VisionZipQwen3VLForConditionalGeneration.from_pretrained(
            checkpoints["qwen3_vl"], visionzip=QwenVisionZipConfig(0.45, 0.05, query_chunk=7), attn_implementation=attn
        ).eval()
        assert model.config.vision_config._attn_implementation == attn
        with torch.no_grad():
            outs[attn] = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        assert len(model.model.visual.blocks[-1].attn._forward_pre_hooks) == 0  # hooks removed
    for a, b in zip(outs["sdpa"].token_sources, outs["eager"].token_sources, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(outs["sdpa"].merged_scores, outs["eager"].merged_scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- generation, batching, video -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", DENSE)
def test_generate_with_cache_equals_recomputation_and_batched_equals_one_by_one(family: str, loaded: dict) -> None:
    _, ours, processor = loaded[family]
    inputs = _inputs(processor, CFG, PROMPTS, SIZES)
    assert (inputs["attention_mask"] == 0).any()  # left padding in the batch
    new = 4
    with torch.no_grad():
        out = ours.generate(
            **inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
        full = dict(inputs, input_ids=out.sequences)
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(2, new, dtype=torch.long)], dim=1)
        full["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, new))
        recomputed = ours(**full, use_cache=False).logits[:, -new - 1 : -1]  # (B, new, V)
        torch.testing.assert_close(torch.stack(out.logits, dim=1), recomputed, rtol=1e-4, atol=1e-5)
        for row, (prompt, sizes) in enumerate(zip(PROMPTS, [SIZES[:2], SIZES[2:]], strict=True)):
            alone = _inputs(processor, CFG, [prompt], sizes)
            single = ours.generate(**alone, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            assert torch.equal(single[0, -new:], out.sequences[row, -new:])
            torch.testing.assert_close(ours(**alone).logits[0, -1], out.logits[0][row], rtol=1e-4, atol=1e-5)


def _video_inputs(processor, cfg: QwenVisionZipConfig | None) -> dict:
    """One row: a video of 2 frame groups (8x8 patches), each behind its timestamp as the Qwen3 processor writes it,
    then an image; placeholders expanded by hand (transformers' video processors need torchvision)."""
    image = processor.image_processor(_images(SIZES[:1]), return_tensors="pt")
    video_grid = torch.tensor([[2, 8, 8]])
    per_frame = 16 if cfg is None else sum(cfg.counts(16))
    image_count = int(image["image_grid_thw"].prod()) // MERGE**2
    image_count = image_count if cfg is None else cfg.item_tokens(image["image_grid_thw"][0], MERGE)
    frames = "".join(f"<{t} seconds><|vision_start|>{'<|video_pad|>' * per_frame}<|vision_end|>" for t in (0.5, 2.5))
    picture = "<|vision_start|>" + "<|image_pad|>" * image_count + "<|vision_end|>"
    inputs = dict(processor.tokenizer([f"see {frames} and {picture} what now"], return_tensors="pt"))
    ids = inputs["input_ids"]
    inputs["mm_token_type_ids"] = (ids == processor.image_token_id).long() + 2 * (ids == processor.video_token_id)
    generator = torch.Generator().manual_seed(0)
    inputs.update(pixel_values=image["pixel_values"], image_grid_thw=image["image_grid_thw"], video_grid_thw=video_grid)
    inputs["pixel_values_videos"] = torch.randn(int(video_grid.prod()), 3 * TEMPORAL * PATCH**2, generator=generator)
    return inputs


@pytest.mark.parametrize("family", DENSE)
def test_video_frame_groups_positions_and_generation(family: str, loaded: dict) -> None:
    plain, ours, processor = loaded[family]
    vanilla, pruned = _video_inputs(processor, None), _video_inputs(processor, CFG)
    video_id = ours.config.video_token_id
    with torch.no_grad():
        video = ours.model.get_video_features(pruned["pixel_values_videos"], pruned["video_grid_thw"])
        one = torch.tensor([[1, 8, 8]])
        frames = [ours.model.get_video_features(pixels, one) for pixels in pruned["pixel_values_videos"].chunk(2)]
        assert torch.equal(video.pooler_output[0], torch.cat([f.pooler_output[0] for f in frames]))  # own budgets
        for level in range(len(video.deepstack_features or [])):
            joined = torch.cat([f.deepstack_features[level][0] for f in frames])
            assert torch.equal(video.deepstack_features[level][0], joined)
        images = ours.model.get_image_features(pruned["pixel_values"], pruned["image_grid_thw"])
        positions, _ = ours.model.visionzip_rope_index(
            pruned["input_ids"], pruned["mm_token_type_ids"], None, images, video
        )
        reference, _ = plain.model.get_rope_index(
            vanilla["input_ids"], vanilla["mm_token_type_ids"], vanilla["image_grid_thw"], vanilla["video_grid_thw"]
        )
        v_runs = (vanilla["input_ids"][0] == video_id).nonzero().squeeze(1).view(2, 16)  # a run per frame group
        p_runs = (pruned["input_ids"][0] == video_id).nonzero().squeeze(1).view(2, -1)
        for frame, f in enumerate(frames):
            assert torch.equal(positions[:, 0, p_runs[frame]], reference[:, 0, v_runs[frame][f.token_sources[0]]])
        text = pruned["mm_token_type_ids"][0] == 0
        assert torch.equal(positions[:, 0, text], reference[:, 0, vanilla["mm_token_type_ids"][0] == 0])
        new = 3
        out = ours.generate(**pruned, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)  # fmt: skip
        full = dict(pruned, input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences))
        full["mm_token_type_ids"] = torch.nn.functional.pad(pruned["mm_token_type_ids"], (0, new))
        recomputed = ours(**full, use_cache=False).logits[:, -new - 1 : -1]
        torch.testing.assert_close(torch.stack(out.logits, dim=1), recomputed, rtol=1e-4, atol=1e-5)


# --- processors, saving --------------------------------------------------------------------------------------------


def test_processor_counts_images_and_each_frame_group(loaded: dict) -> None:
    processor = loaded["qwen3_vl"][2]
    processor.visionzip = CFG.to_dict()
    inputs = _inputs(processor, CFG, [f"a {IMAGE} b"], SIZES[:1])  # 8x12 patches: 24 merged -> 11 + 1
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 12
    counts = processor._get_num_multimodal_tokens(image_sizes=[[32, 48], [64, 32]]).num_image_tokens
    assert counts == [12, 16]  # 11 + 1 of 24, 14 + 2 of 32
    # the video text with a stand-in video processor (torchvision is not installed): timestamps and runs by hand
    processor.video_processor = SimpleNamespace(merge_size=MERGE, temporal_patch_size=TEMPORAL)
    video = {"video_grid_thw": torch.tensor([[2, 8, 8]]),
             "video_metadata": [SimpleNamespace(fps=2.0, frames_indices=[0, 2, 4, 6])]}  # fmt: skip
    run = "<|vision_start|>" + "<|video_pad|>" * 8 + "<|vision_end|>"  # 16 merged tokens: 7 + 1
    assert processor.replace_video_token(video, 0) == f"<0.5 seconds>{run}<2.5 seconds>{run}"
    processor.visionzip = None
    assert processor.replace_video_token(video, 0).count("<|video_pad|>") == 32
    del processor.video_processor
    processor.visionzip = CFG.to_dict()


def test_budget_saved_with_model_and_processor(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    for family in ("qwen3_vl", "qwen3_5_moe"):
        ours_cls, folder = FAMILIES[family][1], tmp_path / family
        model = ours_cls.from_pretrained(checkpoints[family], visionzip=CFG)
        processor = VisionZipQwen3VLProcessor.from_pretrained(checkpoints[family], visionzip=model.visionzip_config)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        assert json.loads((folder / "config.json").read_text())["visionzip"] == CFG.to_dict()
        reloaded = ours_cls.from_pretrained(folder)
        assert reloaded.visionzip_config == CFG
        assert VisionZipQwen3VLProcessor.from_pretrained(folder).visionzip_config == CFG
        assert "visionzip" not in json.loads((folder / "tokenizer_config.json").read_text())
        assert ours_cls.from_pretrained(folder, visionzip=None).visionzip_config is None
        for name, tensor in model.state_dict().items():
            assert torch.equal(reloaded.state_dict()[name], tensor), name


# --- what visionzip.hf.qwen3_vl reads upstream (transformers 5.23) ---------------------------------------------------


def test_upstream_pieces_visionzip_hf_qwen3_vl_reads() -> None:
    """The towers' last-block attention (``qkv``, ``num_heads``, ``scaling``; ``cu_seqlens`` and
    ``position_embeddings`` by keyword), the modules' rotary function, DeepStack's output field and where the models
    read it, and the per-frame split of video grids in ``get_rope_index``: one place that says what moved."""
    import inspect

    from transformers.models.qwen3_5 import modeling_qwen3_5
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe

    for module in (modeling_qwen3_vl, modeling_qwen3_vl_moe, modeling_qwen3_5, modeling_qwen3_5_moe):
        assert callable(getattr(module, "apply_rotary_pos_emb_vision", None)), module.__name__
        prefix = {"modeling_qwen3_vl": "Qwen3VL", "modeling_qwen3_vl_moe": "Qwen3VLMoe", "modeling_qwen3_5": "Qwen3_5",
                  "modeling_qwen3_5_moe": "Qwen3_5Moe"}[module.__name__.rsplit(".", 1)[-1]]  # fmt: skip
        attention = getattr(module, f"{prefix}VisionAttention")
        assert {"cu_seqlens", "position_embeddings"} <= set(inspect.signature(attention.forward).parameters)
        model = getattr(module, f"{prefix}Model")
        assert "repeat_interleave(video_grid_thw" in inspect.getsource(model.get_rope_index)  # a run per frame group
        assert "mm_encoder_outputs" in inspect.signature(model.forward).parameters
        if "VL" in prefix:
            assert "deepstack_features" in inspect.getsource(model.forward)
            assert "deepstack_features" in module.BaseModelOutputWithDeepstackFeatures.__dataclass_fields__
    tower = modeling_qwen3_vl.Qwen3VLVisionModel(
        modeling_qwen3_vl.Qwen3VLVisionConfig(depth=2, hidden_size=16, num_heads=2, intermediate_size=16)
    )
    attn = tower.blocks[-1].attn
    assert attn.qkv.out_features == 3 * attn.num_heads * round(attn.scaling**-2) and tower.spatial_merge_size == 2
