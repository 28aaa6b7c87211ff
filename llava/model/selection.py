"""DivPrune, VisPruner and CDPruner in our LLaVA: each view's kept patches, between the encoder and the language model.

The selection acts where VisionZip does (spec sections 5-7; ``visionzip.baselines.select``): every view of the batch
is encoded once to the layer LLaVA reads (``mm_vision_select_layer``), each view keeps ``tokens`` = T of its N patches
(per crop on AnyRes, the references' "32 x 5 = 160"), and the language model receives the kept patches' projected
tokens in raster order with packed positions; AnyRes images are laid out as VisionZip's per-crop layout
(:func:`visionzip.anyres.visionzip_layout` with dominant = T, no ``image_newline``). DivPrune reads the projected
patches; VisPruner the encoder's patches and their [CLS] attention at that layer (through the tower's capture seam,
no eager attention); CDPruner the projected patches and each patch's relevance to the instruction of the row its
image belongs to, from the text tower of the CLIP checkpoint LLaVA names as ``mm_vision_tower``. That text tower is
held outside the model's state dict: never saved in a checkpoint, never among its parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.hub import local_checkpoint
from visionzip.baselines.divprune import check_keep
from visionzip.baselines.select import SelectionConfig, gather_kept, needs_text, select_views, selection_from_dict

TEXT_NEEDED = "CDPruner needs each row's instruction: pass instructions=[...] (one text per row of input_ids)"
# ImageParts: per image, its kept tokens (V, T, C_llm), their encoder positions (V, T) ([CLS] counted, as VisionZip's
# keep), and the config that chose them
ImagePart = tuple[torch.Tensor, torch.Tensor, SelectionConfig]


@dataclass
class _TextTowerSlot:
    """Holds CLIP's text side for CDPruner on a model without registering it as a submodule (a plain object is not one:
    nothing of it reaches ``state_dict`` or ``parameters``)."""

    relevance: Any
    source: str


def set_selection(model: Any, cfg: SelectionConfig | dict | None) -> None:
    """:meth:`LlavaMetaForCausalLM.set_selection`: check ``cfg`` against the model, write ``config.token_selection``.

    One method at a time: refused (ValueError naming both) while VisionZip or an in-LLM method is on; T larger
    than a view's patches is refused with the numbers; CDPruner loads its text tower now, so that a tower without
    one fails here rather than at the first image.
    """
    if cfg is None:
        model.config.token_selection = None
        return
    cfg = selection_from_dict(cfg) if isinstance(cfg, dict) else cfg
    vz, pruning = model.config.visionzip_config(), getattr(model.config, "token_pruning", None)
    if vz is not None:
        raise ValueError(
            f"{cfg.describe()} and VisionZip {vz.dominant}+{vz.contextual} both choose the image tokens: one method "
            "at a time; turn VisionZip off first (set_visionzip(None), or --no-visionzip)"
        )
    if pruning:
        raise ValueError(
            f"{cfg.describe()} and the in-LLM method {pruning.get('method')} are both set: one method at a time; "
            "turn that one off first (set_pruning(None))"
        )
    tower = model.get_vision_tower()
    if tower.select_feature != "patch":
        raise ValueError(
            f"{cfg.name} picks among the patches: needs mm_vision_select_feature='patch', got {tower.select_feature!r}"
        )
    patches = tower.num_patches_per_side**2
    if cfg.tokens > patches:
        raise ValueError(
            f"{cfg.describe()} per view, but a view here has {patches} patches: expected tokens <= {patches}"
        )
    if needs_text(cfg):
        text_relevance(model)
    model.config.token_selection = cfg.to_dict()


def refuse_beside_selection(model: Any, method: str) -> None:
    """ValueError naming both when ``method`` (VisionZip, an in-LLM method) is switched on beside a selection."""
    saved = model.config.selection_config()
    if saved is not None:
        raise ValueError(
            f"{method} and {saved.describe()} both set: one method at a time; turn the selection off first "
            "(set_selection(None))"
        )


def text_relevance(model: Any) -> Any:
    """CDPruner's ``CLIPTextRelevance`` for ``model``: loaded once from ``config.mm_vision_tower`` (a full CLIP
    checkpoint holds the text tower beside the vision tower), kept on the vision tower's device and dtype."""
    from visionzip.hf.clip_text import CLIPTextRelevance  # transformers' CLIP text classes: only CDPruner needs them

    tower = model.get_vision_tower()
    slot = getattr(model, "_selection_text_tower", None)
    if slot is None or slot.source != model.config.mm_vision_tower:
        name = model.config.mm_vision_tower
        relevance = CLIPTextRelevance.from_pretrained(local_checkpoint(name), dtype=tower.dtype, device=tower.device)
        slot = _TextTowerSlot(relevance, name)
        model._selection_text_tower = slot  # a plain object: nn.Module.__setattr__ registers nothing
    relevance = slot.relevance
    if relevance.text.device != tower.device:  # the model moved since (``model.to``): the text side follows
        relevance.text.to(tower.device)
        relevance.projection = relevance.projection.to(tower.device)
    return relevance


def image_instructions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, instructions: Sequence[str] | None
) -> list[str] | None:
    """One instruction per row of ``input_ids`` (B, L) -> one per image placeholder, in reading order."""
    if instructions is None:
        return None
    if isinstance(instructions, str) or len(instructions) != input_ids.shape[0]:
        given = "one string" if isinstance(instructions, str) else f"{len(instructions)}"
        raise ValueError(f"instructions are one text per row of input_ids: expected {input_ids.shape[0]}, got {given}")
    is_image = input_ids == IMAGE_TOKEN_INDEX
    if attention_mask is not None:
        is_image = is_image & attention_mask.bool()
    counts = is_image.sum(dim=1).tolist()
    return [text for text, count in zip(instructions, counts, strict=True) for _ in range(count)]


def select_images(
    model: Any, views: list[torch.Tensor], cfg: SelectionConfig, instructions: Sequence[str] | None = None
) -> list[ImagePart]:
    """Each image's kept tokens under ``cfg``; one encoder and one projector call for the whole batch.

    Args:
        views: one (V_i, 3, H, W) tensor per image (V_i = 1, or the base view and the AnyRes crops).
        instructions: one per image (CDPruner's relevance reads it; the others none).

    Returns:
        per image: tokens (V_i, T, C_llm) in raster order, their encoder positions (V_i, T) ([CLS] at 0, as
        VisionZip's ``keep``: patch p is p + 1), and ``cfg``.
    """
    sizes = [v.shape[0] for v in views]
    if needs_text(cfg) and instructions is None:
        raise ValueError(TEXT_NEEDED)
    if instructions is not None and len(instructions) != len(views):
        raise ValueError(f"expected one instruction per image ({len(views)}), got {len(instructions)}")
    tower, projector = model.get_vision_tower(), model.get_model().mm_projector
    patches, attention = tower.forward_patches(torch.cat(views), cls_attention=cfg.name == "vispruner")  # (sum V, N, C)
    check_keep(cfg.name, cfg.tokens, patches.shape[1])
    with torch.no_grad():  # the choice is indices: no gradient flows through it
        if cfg.features == "encoder":  # VisPruner: chosen before the projector, which then runs on the kept ones
            keep = select_views(cfg, encoder=patches, cls_attention=attention)  # (sum V, T)
        else:
            relevance = None
            if needs_text(cfg):
                per_view = [text for text, size in zip(instructions, sizes, strict=True) for _ in range(size)]
                relevance = text_relevance(model).relevance(patches, tower.post_layernorm, per_view)  # (sum V, N)
    if cfg.features == "encoder":
        tokens = projector(gather_kept(patches, keep))  # (sum V, T, C_llm)
    else:
        projected = projector(patches)  # (sum V, N, C_llm)
        with torch.no_grad():
            keep = select_views(cfg, projected=projected, relevance=relevance)
        tokens = gather_kept(projected, keep)
    prefix = tower.num_tokens - tower.num_patches_per_side**2
    return [(t, k + prefix, cfg) for t, k in zip(tokens.split(sizes), keep.split(sizes), strict=True)]
