"""VisionZip subclasses of transformers' Qwen2-VL / Qwen2.5-VL against independent references.

Tiny random checkpoints (vision: patch 4, 2x2 merge, 2 blocks, 4 heads; Qwen2.5-VL's last block uses window
attention; LLM: 2 layers) saved with ``save_pretrained`` in tmp_path. References: the last block's attention maps
from transformers' eager attention on queries and keys recomputed from the block's input, Qwen2.5-VL's window order
undone by a loop over its windows, and the loop restatement of the method (``helpers/visionzip_reference.py``); the
parents' own ``get_rope_index`` on the vanilla sequence; the parents' logits; a recomputation without cache;
one-by-one runs.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.qwen_tiny import MERGE, PATCH, TEMPORAL, write_tiny_qwen
from helpers.visionzip_reference import reference_compress
from PIL import Image
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_vl import modeling_qwen2_vl

from visionzip.bench import LiveBytes
from visionzip.capture import segment_received_scores
from visionzip.hf.qwen2_vl import (
    QwenVisionZipConfig,
    VisionZipQwen2_5_VLForConditionalGeneration,
    VisionZipQwen2_5_VLProcessor,
    VisionZipQwen2VLForConditionalGeneration,
    VisionZipQwen2VLProcessor,
)

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPTS = [f"hi {IMAGE} and {IMAGE} what colour is it", f"a {IMAGE} b"]
SIZES = [(32, 48), (64, 32), (40, 40)]  # (height, width): 8x12, 16x8, 10x10 patches
CFG = QwenVisionZipConfig(0.45, 0.05)  # the paper's 50%
FAMILIES = {
    "qwen2": (
        Qwen2VLForConditionalGeneration, VisionZipQwen2VLForConditionalGeneration, VisionZipQwen2VLProcessor,
        modeling_qwen2_vl,
    ),
    "qwen2_5": (
        Qwen2_5_VLForConditionalGeneration, VisionZipQwen2_5_VLForConditionalGeneration, VisionZipQwen2_5_VLProcessor,
        modeling_qwen2_5_vl,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random checkpoint per family, with a plain-count processor, saved by save_pretrained."""
    families = {name: (plain, processor) for name, (plain, _, processor, _) in FAMILIES.items()}
    return write_tiny_qwen(tmp_path_factory.mktemp("hf_qwen"), families)


@pytest.fixture(scope="module")
def loaded(checkpoints: dict[str, Path]) -> dict[str, tuple]:
    """(plain model, VisionZip model with CFG, VisionZip processor with CFG) per family, loaded once."""
    out = {}
    for family, (plain_cls, ours_cls, processor_cls, _) in FAMILIES.items():
        plain = plain_cls.from_pretrained(checkpoints[family]).eval()
        ours = ours_cls.from_pretrained(checkpoints[family], visionzip=CFG).eval()
        out[family] = (plain, ours, processor_cls.from_pretrained(checkpoints[family], visionzip=CFG))
    return out


def _images(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """Random images, each drawn from its own size: the same image alone or in a batch."""
    draws = [np.random.default_rng([h, w]).integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    return [Image.fromarray(pixels) for pixels in draws]


def _inputs(processor, cfg: QwenVisionZipConfig | None, prompts: list[str], sizes: list[tuple[int, int]]):
    processor.visionzip = None if cfg is None else cfg.to_dict()
    return processor(images=_images(sizes), text=prompts, return_tensors="pt", padding=True)


# --- scores and kept tokens against eager attention maps -----------------------------------------------------------


def _eager_scores(family: str, model, seen: dict, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged-token scores (sum M,) and head-mean keys (sum M, Dh), raster order, from eager attention maps."""
    modeling, visual = FAMILIES[family][3], model.model.visual
    attn = visual.blocks[-1].attn
    s = seen["hidden"].shape[0]
    q, k, v = attn.qkv(seen["hidden"]).reshape(s, 3, attn.num_heads, -1).permute(1, 2, 0, 3).unbind(0)  # (H, S, Dh)
    cos, sin = seen["rotary"]
    q, k = modeling.apply_rotary_pos_emb_vision(q.transpose(0, 1), k.transpose(0, 1), cos, sin)  # (S, H, Dh)
    bounds = seen["cu_seqlens"].tolist()
    received = []
    for start, end in itertools.pairwise(bounds):
        segment = [x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v.transpose(0, 1))]  # (1, H, L, Dh)
        _, weights = modeling.eager_attention_forward(attn, *segment, None, attn.scaling)  # (1, H, L, L)
        received.append(weights[0].float().mean(dim=0).sum(dim=0))  # mean over heads, summed over queries
    scores = torch.cat(received).view(-1, MERGE * MERGE).mean(dim=1)
    keys = k.float().mean(dim=1).view(-1, MERGE * MERGE, k.shape[-1]).mean(dim=1)
    if family == "qwen2_5":
        order = _raster_order(grid, visual.window_size // MERGE // PATCH)
        scores, keys = scores[order], keys[order]
    return scores, keys


def _raster_order(grid: torch.Tensor, window: int) -> torch.Tensor:
    """For each merged token in raster order, where Qwen2.5-VL's blocks hold it: they run each item's frames one by
    one, each frame window by window (``window`` x ``window`` merged tokens, the last ones cut at the border), the
    windows and the tokens inside one in raster order. A plain loop, not transformers' window index."""
    blocks_order: list[int] = []  # raster index of the merged token at each place of the blocks' order
    start = 0
    for t, h, w in grid.tolist():
        rows, cols = h // MERGE, w // MERGE
        for frame in range(t):
            for top, left in itertools.product(range(0, rows, window), range(0, cols, window)):
                for r, c in itertools.product(
                    range(top, min(top + window, rows)), range(left, min(left + window, cols))
                ):
                    blocks_order.append(start + frame * rows * cols + r * cols + c)
        start += t * rows * cols
    place = [0] * len(blocks_order)
    for at, index in enumerate(blocks_order):
        place[index] = at
    return torch.tensor(place)


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_and_kept_tokens_equal_the_eager_attention_maps(family: str, loaded: dict) -> None:
    _, model, processor = loaded[family]
    inputs = _inputs(processor, CFG, PROMPTS, SIZES)
    grid, seen = inputs["image_grid_thw"], {}
    attn = model.model.visual.blocks[-1].attn

    def keep(_m, args, kwargs) -> None:
        seen.update(hidden=args[0], cu_seqlens=kwargs["cu_seqlens"], rotary=kwargs["position_embeddings"])

    handle = attn.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], grid)
        handle.remove()
        merged = model.model.visual(inputs["pixel_values"], grid_thw=grid).pooler_output  # raster order
        scores, keys = _eager_scores(family, model, seen, grid)
    assert model.config.vision_config._attn_implementation == "sdpa"  # the tower kept its implementation
    assert len(attn._forward_pre_hooks) == 0 and len(attn.qkv._forward_hooks) == 0  # hooks removed
    if family == "qwen2_5":
        assert len(seen["cu_seqlens"]) - 1 > len(SIZES)  # the scoring block attends within windows
    sizes = [int(t * h * w) // MERGE**2 for t, h, w in grid.tolist()]
    parts = zip(scores.split(sizes), keys.split(sizes), merged.split(sizes), strict=True)
    for i, (score, key, tokens) in enumerate(parts):
        torch.testing.assert_close(out.merged_scores[i], score, rtol=1e-5, atol=1e-6)
        seg = CFG.segment_config(sizes[i])
        expected, keep_ref = reference_compress(tokens[None], score[None], key[None], seg)  # loops, float64
        keep_ref = torch.tensor(keep_ref)
        assert torch.equal(out.token_sources[i][: seg.dominant], keep_ref[0])
        assert keep_ref.shape[1] == seg.dominant and out.pooler_output[i].shape[0] == seg.tokens
        torch.testing.assert_close(out.pooler_output[i], expected[0], rtol=1e-5, atol=1e-6)


def test_capture_memory_is_chunk_by_tokens() -> None:
    """LiveBytes (the bench's op-output meter) over the scoring: a (H, chunk, T) block at a time, not T x T."""
    torch.manual_seed(0)
    tokens, heads, dim, chunk = 2048, 4, 8, 64
    q, k = torch.randn(tokens, heads, dim), torch.randn(tokens, heads, dim)
    bounds = torch.tensor([0, tokens])
    with LiveBytes() as meter:
        scores = segment_received_scores(q, k, bounds, dim**-0.5, chunk)
    block, dense = heads * chunk * tokens * 4, heads * tokens * tokens * 4
    assert meter.peak < 3 * block + 4 * q.numel() * 4  # a few chunk blocks and fp32 copies of q and k
    assert meter.peak < dense / 8
    small = torch.tensor([0, 100, 300])  # two segments, against a dense map per segment
    expected = []
    for start, end in zip(small[:-1].tolist(), small[1:].tolist(), strict=True):
        logits = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * dim**-0.5
        expected.append(logits.softmax(dim=-1).mean(dim=0).sum(dim=0))
    got = segment_received_scores(q[:300], k[:300], small, dim**-0.5, 7)
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)
    assert scores.shape == (tokens,)


def test_model_capture_memory_follows_the_chunk(loaded: dict) -> None:
    """LiveBytes over get_image_features of one 16x16-patch image (T = 256, full attention in the last block): with
    query_chunk=16 the extra over VisionZip off stays far below one T x T map; with query_chunk=T it exceeds one
    (the meter sees such a map when it is made)."""
    _, model, processor = loaded["qwen2"]
    inputs = _inputs(processor, None, [f"a {IMAGE} b"], [(64, 64)])
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]
    peaks = {}
    try:
        for chunk in (None, 16, 256):
            model.set_visionzip(None if chunk is None else QwenVisionZipConfig(0.45, 0.05, query_chunk=chunk))
            with torch.no_grad(), LiveBytes() as meter:
                model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            peaks[chunk] = meter.peak
    finally:
        model.set_visionzip(CFG)
    dense = 4 * 256 * 256 * 4  # heads x T x T in fp32
    assert peaks[16] - peaks[None] < dense / 4
    assert peaks[256] - peaks[None] > dense


# --- identity cases, positions, generation, batching ---------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_off_is_the_parent_and_keeping_everything_gives_its_logits(family: str, loaded: dict) -> None:
    plain, ours, processor = loaded[family]
    vanilla = _inputs(processor, None, PROMPTS, SIZES)
    everything = QwenVisionZipConfig.from_retention(1.0)
    assert torch.equal(_inputs(processor, everything, PROMPTS, SIZES)["input_ids"], vanilla["input_ids"])
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        expected = plain(**vanilla).logits
        expected_tokens = plain.generate(**vanilla, **gen)
        try:
            ours.set_visionzip(None)
            assert torch.equal(ours(**vanilla).logits, expected)
            assert torch.equal(ours.generate(**vanilla, **gen), expected_tokens)
            ours.set_visionzip(everything)
            assert torch.equal(ours(**vanilla).logits, expected)
            assert torch.equal(ours.generate(**vanilla, **gen), expected_tokens)
        finally:
            ours.set_visionzip(CFG)


def _runs(ids: torch.Tensor, token: int) -> list[torch.Tensor]:
    """Positions of each contiguous run of ``token`` in a 1-D id tensor."""
    where = (ids == token).nonzero().squeeze(1)
    return list(where.tensor_split(((where[1:] - where[:-1]) != 1).nonzero().squeeze(1) + 1)) if len(where) else []


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_of_kept_tokens_and_text_are_the_vanilla_ones(family: str, loaded: dict) -> None:
    plain, ours, processor = loaded[family]
    vanilla, pruned = _inputs(processor, None, PROMPTS, SIZES), _inputs(processor, CFG, PROMPTS, SIZES)
    image_id = ours.config.image_token_id
    with torch.no_grad():
        reference, reference_deltas = plain.model.get_rope_index(
            vanilla["input_ids"], vanilla["mm_token_type_ids"], vanilla["image_grid_thw"],
            attention_mask=vanilla["attention_mask"],
        )  # fmt: skip
        features = ours.model.get_image_features(pruned["pixel_values"], pruned["image_grid_thw"])
        positions, deltas = ours.model.visionzip_rope_index(
            pruned["input_ids"], pruned["mm_token_type_ids"], pruned["attention_mask"], features, None
        )
    item = 0
    for row in range(len(PROMPTS)):
        v_ids, p_ids = vanilla["input_ids"][row], pruned["input_ids"][row]
        v_runs, p_runs = _runs(v_ids, image_id), _runs(p_ids, image_id)
        for v_run, p_run in zip(v_runs, p_runs, strict=True):
            sources = features.token_sources[item]
            assert torch.equal(positions[:, row, p_run], reference[:, row, v_run[sources]])
            item += 1
        v_text = (v_ids != image_id) & vanilla["attention_mask"][row].bool()
        p_text = (p_ids != image_id) & pruned["attention_mask"][row].bool()
        assert torch.equal(positions[:, row, p_text], reference[:, row, v_text])  # text keeps its positions
        # the next (decoded) token: vanilla length + vanilla delta == pruned length + our delta
        assert (
            int(v_text.sum()) + len(torch.cat(v_runs)) + reference_deltas[row]
            == int(pruned["attention_mask"][row].sum()) + deltas[row]
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_recomputation_and_batched_equals_one_by_one(family: str, loaded: dict) -> None:
    _, ours, processor = loaded[family]
    inputs = _inputs(processor, CFG, PROMPTS, SIZES)
    new = 5
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
        sizes = [SIZES[:2], SIZES[2:]]
        for row, prompt in enumerate(PROMPTS):
            alone = _inputs(processor, CFG, [prompt], sizes[row])
            single = ours.generate(**alone, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            assert torch.equal(single[0, -new:], out.sequences[row, -new:])
            last = ours(**alone).logits[0, -1]
            torch.testing.assert_close(last, out.logits[0][row], rtol=1e-4, atol=1e-5)


def _video_inputs(processor, cfg: QwenVisionZipConfig | None, family: str) -> dict:
    """One row: a video (2 frame groups of 8x8 patches) and an image, placeholders expanded by hand: transformers'
    processors take videos only through a video processor, which needs torchvision (not installed here)."""
    image = processor.image_processor(_images(SIZES[:1]), return_tensors="pt")
    grids = {"video": torch.tensor([[2, 8, 8]]), "image": image["image_grid_thw"]}
    count = {k: int(g.prod()) // MERGE**2 if cfg is None else cfg.item_tokens(g[0], MERGE) for k, g in grids.items()}
    video = "<|vision_start|>" + "<|video_pad|>" * count["video"] + "<|vision_end|>"
    picture = "<|vision_start|>" + "<|image_pad|>" * count["image"] + "<|vision_end|>"
    inputs = dict(processor.tokenizer([f"see {video} and {picture} what now"], return_tensors="pt"))
    ids = inputs["input_ids"]
    inputs["mm_token_type_ids"] = (ids == processor.image_token_id).long() + 2 * (
        ids == processor.video_token_id
    ).long()
    generator = torch.Generator().manual_seed(0)
    inputs.update(pixel_values=image["pixel_values"], image_grid_thw=grids["image"], video_grid_thw=grids["video"])
    inputs["pixel_values_videos"] = torch.randn(
        int(grids["video"].prod()), 3 * TEMPORAL * PATCH**2, generator=generator
    )
    if family == "qwen2_5":
        inputs["second_per_grid_ts"] = torch.tensor([1.5])
    return inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_video_frame_groups_positions_and_generation(family: str, loaded: dict) -> None:
    plain, ours, processor = loaded[family]
    vanilla, pruned = _video_inputs(processor, None, family), _video_inputs(processor, CFG, family)
    timing = {"second_per_grid_ts": vanilla.get("second_per_grid_ts")}
    with torch.no_grad():
        video = ours.model.get_video_features(pruned["pixel_values_videos"], pruned["video_grid_thw"])
        frames = [
            ours.model.get_video_features(pixels, torch.tensor([[1, 8, 8]])).pooler_output[0]
            for pixels in pruned["pixel_values_videos"].chunk(2)
        ]
        assert torch.equal(video.pooler_output[0], torch.cat(frames))  # each frame group has its own budget
        images = ours.model.get_image_features(pruned["pixel_values"], pruned["image_grid_thw"])
        positions, _ = ours.model.visionzip_rope_index(
            pruned["input_ids"], pruned["mm_token_type_ids"], None, images, video, **timing
        )
        reference, _ = plain.model.get_rope_index(
            vanilla["input_ids"], vanilla["mm_token_type_ids"], vanilla["image_grid_thw"], vanilla["video_grid_thw"],
            attention_mask=None, **timing,
        )  # fmt: skip
        run = (pruned["input_ids"][0] == ours.config.video_token_id).nonzero().squeeze(1)
        start = int((vanilla["input_ids"][0] == ours.config.video_token_id).nonzero()[0])
        assert torch.equal(positions[:, 0, run], reference[:, 0, start + video.token_sources[0]])
        assert positions[0, 0, run].unique().numel() == 2  # two temporal positions, one per frame group
        new = 4
        out = ours.generate(**pruned, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)  # fmt: skip
        full = dict(pruned, input_ids=out.sequences)
        full["mm_token_type_ids"] = torch.nn.functional.pad(pruned["mm_token_type_ids"], (0, new))
        full["attention_mask"] = torch.ones_like(out.sequences)
        recomputed = ours(**full, use_cache=False).logits[:, -new - 1 : -1]
        torch.testing.assert_close(torch.stack(out.logits, dim=1), recomputed, rtol=1e-4, atol=1e-5)
        # decoding by hand: the prefill sets rope_deltas, the next step's positions come from them
        prefill = ours(**pruned, use_cache=True)
        step = ours(input_ids=out.sequences[:, -new : -new + 1], past_key_values=prefill.past_key_values)
        torch.testing.assert_close(step.logits[:, -1], out.logits[1], rtol=1e-4, atol=1e-5)


# --- saving, processors, config ------------------------------------------------------------------------------------


def test_budget_saved_with_model_and_processor(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    _, ours_cls, processor_cls, _ = FAMILIES["qwen2_5"]
    model = ours_cls.from_pretrained(checkpoints["qwen2_5"], visionzip=CFG)
    processor = processor_cls.from_pretrained(checkpoints["qwen2_5"], visionzip=model.visionzip_config)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["visionzip"] == CFG.to_dict()
    assert ours_cls.from_pretrained(tmp_path).visionzip_config == CFG
    reloaded = processor_cls.from_pretrained(tmp_path)
    assert reloaded.visionzip_config == CFG
    assert "visionzip" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert ours_cls.from_pretrained(tmp_path, visionzip=None).visionzip_config is None
    counts = reloaded._get_num_multimodal_tokens(image_sizes=[[32, 48], [64, 32]]).num_image_tokens
    assert counts == [sum(CFG.counts(24)), sum(CFG.counts(32))] == [12, 16]  # 11+1 of 24, 14+2 of 32


def test_config_budgets_and_errors() -> None:
    assert QwenVisionZipConfig.from_retention(0.7) == QwenVisionZipConfig(0.65, 0.05)
    assert QwenVisionZipConfig.from_retention(0.5) == QwenVisionZipConfig(0.45, 0.05)
    assert QwenVisionZipConfig.from_retention(1.0).counts(37) == (37, 0)
    assert QwenVisionZipConfig(0.65, 0.05).counts(100) == (65, 5)
    assert QwenVisionZipConfig(0.45, 0.05).counts(1) == (1, 0)  # at least one dominant token
    assert QwenVisionZipConfig(10, 2).counts(12) == (10, 2)
    assert QwenVisionZipConfig(10, 2).item_tokens([3, 8, 8], 2) == 36  # 3 frame groups of 16 merged tokens
    assert QwenVisionZipConfig.from_dict(CFG.to_dict()) == CFG
    for bad in [(0.5, 1), (10, 0.5), (True, 0), (0.0, 0.1), (0.9, 0.2), (0, 1)]:
        with pytest.raises(ValueError):
            QwenVisionZipConfig(*bad)
    with pytest.raises(ValueError, match="larger"):
        QwenVisionZipConfig(10, 2).counts(11)
    with pytest.raises(ValueError, match="unknown"):
        QwenVisionZipConfig.from_dict({"dominant": 0.5, "layer": -1})
