"""CDPruner's instruction relevance from CLIP's own text tower (spec section 7): the checkpoints LLaVA names as its
``mm_vision_tower`` (``openai/clip-vit-large-patch14-336``) hold both towers, so the relevance needs no new weights.

Image side: E_v = visual_projection(post_layernorm(F)) of the patch features F LLaVA reads. Text side: the
instruction's CLIP text embedding. An instruction longer than the text tower's positions is cut into segments and
the relevance averages over them, as the reference does. Deliberate difference: each segment is a whole CLIP text
(BOS, at most ``positions - 2`` tokens, EOS), so the tower pools at a real EOS in every segment; the reference
zero-pads the flat token list and reshapes it, leaving later segments without BOS/EOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoTokenizer, CLIPTextModelWithProjection, PretrainedConfig
from transformers.utils import cached_file

from visionzip.baselines.cdpruner import cdpruner_relevance
from visionzip.hf.loading import quiet_load_report

PROJECTION_KEY = "visual_projection.weight"
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)  # fmt: skip


def _weight_file(name_or_path: str, key: str) -> str | None:
    """The local file (single or shard) of ``name_or_path`` that holds ``key``: a folder or a hub id in the cache."""
    for filename in WEIGHT_FILES:
        path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False)
        if path is None:
            continue
        if filename.endswith(".index.json"):
            shard = json.loads(Path(path).read_text())["weight_map"].get(key)
            return None if shard is None else cached_file(name_or_path, shard)
        return path
    return None


def load_tensor(name_or_path: str, key: str) -> torch.Tensor:
    """One tensor of a checkpoint, read safely (safetensors, else ``torch.load(weights_only=True)``); ValueError
    naming the checkpoint and the key when it is not there."""
    path = _weight_file(name_or_path, key)
    if path is not None and path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            if key in f.keys():  # noqa: SIM118 (safe_open has keys(), no __contains__)
                return f.get_tensor(key)
    elif path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if key in state:
            return state[key]
    raise ValueError(f"{name_or_path} holds no {key!r}: CDPruner needs a full CLIP checkpoint (vision and text towers)")


class CLIPTextRelevance:
    """CLIP's text tower, tokenizer and image projection, held outside any model's state dict (never saved with it).

    Attributes:
        text: the ``CLIPTextModelWithProjection`` (eval mode, no gradients).
        projection: (D, C_vision) CLIP's ``visual_projection`` weight.
    """

    def __init__(self, text: CLIPTextModelWithProjection, tokenizer: Any, projection: torch.Tensor) -> None:
        self.text, self.tokenizer = text.eval().requires_grad_(False), tokenizer
        self.projection = projection.to(device=text.device, dtype=text.dtype)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> CLIPTextRelevance:
        """Load from a full CLIP checkpoint (a folder or a hub id, resolved as transformers resolves it: offline from
        the cache when ``HF_HUB_OFFLINE=1``). ValueError naming the checkpoint when it is vision-only."""
        kind = PretrainedConfig.get_config_dict(name_or_path)[0].get("model_type")
        if kind != "clip":
            raise ValueError(
                f"{name_or_path} is a {kind!r} checkpoint, not a full CLIP: CDPruner needs CLIP's text "
                "tower (openai/clip-vit-large-patch14-336 and the other released CLIP folders hold both towers)"
            )
        with quiet_load_report():  # the vision tower's keys are "unexpected" for the text model: expected here
            text, info = CLIPTextModelWithProjection.from_pretrained(
                name_or_path, dtype=dtype, output_loading_info=True
            )
        if info.get("missing_keys"):
            raise ValueError(f"{name_or_path}'s text tower lacks weights: {sorted(info['missing_keys'])[:20]}")
        projection = load_tensor(name_or_path, PROJECTION_KEY)
        relevance = cls(text.to(device) if device is not None else text, AutoTokenizer.from_pretrained(name_or_path),
                        projection)  # fmt: skip
        return relevance

    def segments(self, instruction: str) -> list[list[int]]:
        """The instruction as whole CLIP texts of at most ``max_position_embeddings`` ids: [BOS, ..., EOS] each."""
        config = self.text.config
        ids = self.tokenizer(instruction, add_special_tokens=False, verbose=False)["input_ids"]  # segments: no limit
        width = config.max_position_embeddings - 2
        chunks = [ids[start : start + width] for start in range(0, len(ids), width)] or [[]]
        return [[config.bos_token_id, *chunk, config.eos_token_id] for chunk in chunks]

    @torch.no_grad()
    def text_embeds(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, D) text embeddings of each instruction's M segments (padded), and (B, M) bool: which are real."""
        per_row = [self.segments(text) for text in instructions]
        flat = [segment for row in per_row for segment in row]
        width = max(len(segment) for segment in flat)
        device = self.text.device
        ids = torch.full((len(flat), width), self.text.config.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(flat), width, dtype=torch.long, device=device)
        for i, segment in enumerate(flat):
            ids[i, : len(segment)] = torch.tensor(segment, device=device)
            mask[i, : len(segment)] = 1
        embeds = self.text(input_ids=ids, attention_mask=mask).text_embeds  # (sum M_i, D)
        most = max(len(row) for row in per_row)
        out = embeds.new_zeros(len(per_row), most, embeds.shape[-1])
        real = torch.zeros(len(per_row), most, dtype=torch.bool, device=device)
        for row, chunk in enumerate(embeds.split([len(r) for r in per_row])):
            out[row, : chunk.shape[0]], real[row, : chunk.shape[0]] = chunk, True
        return out, real

    @torch.no_grad()
    def image_embeds(self, patches: torch.Tensor, post_layernorm: nn.Module) -> torch.Tensor:
        """E_v = visual_projection(post_layernorm(F)): (V, N, C_vision) -> (V, N, D)."""
        normed = post_layernorm(patches)
        return normed.to(self.projection) @ self.projection.T

    def relevance(self, patches: torch.Tensor, post_layernorm: nn.Module, instructions: list[str]) -> torch.Tensor:
        """Each patch's relevance to its view's instruction, min-max normalised per view (``cdpruner_relevance``).

        Args:
            patches: (V, N, C_vision) patch features of the layer LLaVA reads ([CLS] removed).
            post_layernorm: the vision tower's ``post_layernorm``.
            instructions: V strings, one per view (the views of one image repeat their row's instruction).

        Returns:
            (V, N) fp32.
        """
        if len(instructions) != patches.shape[0]:
            raise ValueError(f"CDPruner needs one instruction per view: {patches.shape[0]} views, {len(instructions)}")
        unique = list(dict.fromkeys(instructions))  # views of one image share theirs: encode each text once
        text, real = self.text_embeds(unique)
        index = torch.tensor([unique.index(t) for t in instructions], device=text.device)
        return cdpruner_relevance(self.image_embeds(patches, post_layernorm), text[index], real[index])
