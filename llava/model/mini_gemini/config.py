"""Mini-Gemini's configuration: LLaVA's keys plus the released ``mgm`` keys of the high-resolution ConvNeXt."""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict

from llava.model.config import LlavaConfig

MGM_MODEL_TYPE = "mgm"  # the released config.json's model_type (MGMConfig on Llama/Vicuna)


@dataclass(repr=False)
class MiniGeminiKeysMixin:
    """The keys Mini-Gemini's training writes beside LLaVA's (read and written unchanged).

    ``mm_vision_tower_aux``: the OpenCLIP ConvNeXt folder (``open_clip_config.json`` and its weights);
    ``image_size_aux``: the side of the high-resolution image the ConvNeXt sees (the CLIP image is that image
    resized to CLIP's side); ``mm_hidden_size_aux``: the ConvNeXt's channels over its four stages, concatenated;
    ``image_grid`` / ``image_global``: the HD variants' crops (1 / False for the Table 14 model, the only ones read
    here); ``optimize_vision_tower(_aux)``: whether training tuned the towers (the tuned ConvNeXt is then in the
    checkpoint's weights).
    """

    mm_vision_tower_aux: str | None = None
    mm_hidden_size_aux: int | None = None
    image_size_aux: int = 320
    image_grid: int = 1
    image_global: bool = False
    optimize_vision_tower: bool = False
    optimize_vision_tower_aux: bool = False

    def check_mini_gemini(self) -> None:
        """Refuse what this family does not load (the HD crops, AnyRes, [CLS] features), with the values found."""
        if not self.mm_vision_tower_aux:
            raise ValueError("a Mini-Gemini config needs mm_vision_tower_aux (the ConvNeXt folder); it has none")
        if self.image_grid != 1 or self.image_global:
            raise ValueError(
                f"Mini-Gemini HD (image_grid={self.image_grid}, image_global={self.image_global}) is not supported: "
                "expected image_grid=1 and image_global=False (the normal-resolution models, as in Table 14)"
            )
        aspect = str(self.image_aspect_ratio or "")
        if aspect.startswith("anyres"):
            raise ValueError(f"Mini-Gemini takes one view per image: image_aspect_ratio {aspect!r} is not supported")
        if self.mm_vision_select_feature != "patch":
            raise ValueError(
                "Mini-Gemini's patch info mining pairs each CLIP patch token with its region of the ConvNeXt map: "
                f"mm_vision_select_feature must be 'patch', got {self.mm_vision_select_feature!r}"
            )


@strict
class MiniGeminiConfig(MiniGeminiKeysMixin, LlavaConfig):
    """Mini-Gemini on a Llama/Vicuna backbone (released ``model_type``: ``mgm``; Mini-Gemini-7B is on Vicuna-7B):
    a LLaVA config (Vicuna's chat template and every LLaVA key) with the keys above."""

    model_type = MGM_MODEL_TYPE
