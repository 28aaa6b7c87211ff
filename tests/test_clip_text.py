"""CDPruner's relevance from CLIP's text tower (visionzip.hf.clip_text) against a plain restatement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.hub_cache import CLIP_ID, cache_repo, offline_hub
from transformers import AutoTokenizer, CLIPModel, CLIPVisionModel

from llava.tiny.clip import write_tiny_clip
from visionzip.hf.clip_text import CLIPTextRelevance


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def plain_relevance(folder: Path, patches: torch.Tensor, instruction: str) -> torch.Tensor:
    """The spec's formula on one view, written out: -cos(E_v, E_t) averaged over 77-token texts, min-max scaled."""
    model, tokenizer = CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    cfg = model.config.text_config
    ids = tokenizer(instruction, add_special_tokens=False, verbose=False)["input_ids"]
    width = cfg.max_position_embeddings - 2
    scores = []
    for start in range(0, max(len(ids), 1), width):
        text = torch.tensor([[cfg.bos_token_id, *ids[start : start + width], cfg.eos_token_id]])
        with torch.no_grad():
            e_t = model.get_text_features(input_ids=text).pooler_output[0]  # (D,)
            e_v = model.visual_projection(model.vision_model.post_layernorm(patches))  # (N, D)
        scores.append(-F.cosine_similarity(e_v, e_t[None], dim=-1))
    s = torch.stack(scores).mean(0)
    return (s - s.min() + 1e-6) / (s.max() - s.min())


def test_relevance_equals_the_plain_formula_per_view_with_its_own_instruction(clip_dir: Path) -> None:
    relevance = CLIPTextRelevance.from_pretrained(str(clip_dir))
    tower = CLIPVisionModel.from_pretrained(clip_dir)
    torch.manual_seed(0)
    patches = torch.randn(3, 16, tower.config.hidden_size)
    texts = ["what colour is the circle?", "is there a red square?", "the shape " * 40]  # the last: 3 segments
    assert len(relevance.segments(texts[2])) > 1
    assert all(len(seg) <= 77 and seg[0] == 510 and seg[-1] == 511 for seg in relevance.segments(texts[2]))
    got = relevance.relevance(patches, tower.post_layernorm, texts)
    for view in range(3):
        torch.testing.assert_close(got[view], plain_relevance(clip_dir, patches[view], texts[view]))
    assert not torch.allclose(got[0], got[1])  # the instruction matters


def test_hub_id_from_an_offline_cache_and_bin_weights(clip_dir: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # the released openai/clip-vit-large-patch14-336 ships pytorch_model.bin
    bin_dir.mkdir()
    torch.save(CLIPModel.from_pretrained(clip_dir).state_dict(), bin_dir / "pytorch_model.bin")
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (bin_dir / name).write_bytes((clip_dir / name).read_bytes())
    assert (bin_dir / "pytorch_model.bin").exists() and not (bin_dir / "model.safetensors").exists()
    cache_repo(tmp_path / "hf_home", CLIP_ID, bin_dir)
    with offline_hub(tmp_path / "hf_home"):
        loaded = CLIPTextRelevance.from_pretrained(CLIP_ID)
    reference = CLIPModel.from_pretrained(clip_dir)
    assert torch.equal(loaded.projection, reference.visual_projection.weight)


def test_a_vision_only_tower_is_refused_by_name(tmp_path: Path, clip_dir: Path) -> None:
    CLIPVisionModel.from_pretrained(clip_dir).save_pretrained(tmp_path / "vision")
    with pytest.raises(ValueError, match=r"is a 'clip_vision_model' checkpoint, not a full CLIP"):
        CLIPTextRelevance.from_pretrained(str(tmp_path / "vision"))
    with pytest.raises(ValueError, match="one instruction per view: 2 views, 1"):
        CLIPTextRelevance.from_pretrained(str(clip_dir)).relevance(torch.zeros(2, 4, 8), torch.nn.Identity(), ["a"])
