"""LLaVA configurations: the released checkpoints' keys, read and written unchanged, plus ``visionzip`` and
``token_selection``."""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MistralConfig

from visionzip import VisionZipConfig
from visionzip.baselines.select import SelectionConfig, selection_from_dict

BUDGET_MODES = ("per_crop", "total")


@dataclass(repr=False)
class LlavaConfigMixin:
    """The multimodal keys of LLaVA's ``config.json`` (shared by every backbone), our ``visionzip`` and
    ``token_selection`` (DivPrune, VisPruner or CDPruner between the encoder and the language model, as a dict)."""

    mm_vision_tower: str | None = None
    mm_hidden_size: int | None = None
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_projector_type: str = "linear"
    mm_patch_merge_type: str = "flat"
    image_aspect_ratio: str | None = "square"
    image_grid_pinpoints: list | str | None = None
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    tokenizer_padding_side: str = "right"
    tokenizer_model_max_length: int | None = None
    visionzip: dict | None = None
    visionzip_budget: str = "per_crop"
    token_selection: dict | None = None

    def visionzip_config(self) -> VisionZipConfig | None:
        """The VisionZip stage as a validated config, or None when it is off."""
        data = getattr(self, "visionzip", None)
        return None if data is None else VisionZipConfig.from_dict(dict(data))

    def selection_config(self) -> SelectionConfig | None:
        """The encoder-side selection (``visionzip.baselines.select``) as a validated config, or None when it is off."""
        data = getattr(self, "token_selection", None)
        return None if data is None else selection_from_dict(dict(data))


@strict
class LlavaConfig(LlavaConfigMixin, LlamaConfig):
    """LLaVA on a Llama/Vicuna backbone (released ``model_type`` values: ``llava`` and ``llava_llama``)."""

    model_type = "llava_llama"


@strict
class LlavaMistralConfig(LlavaConfigMixin, MistralConfig):
    """LLaVA-NeXT on a Mistral backbone (released ``model_type``: ``llava_mistral``)."""

    model_type = "llava_mistral"
