"""Mini-Gemini (MGM) on Llama/Vicuna in our LLaVA: CLIP tokens that mine a high-resolution ConvNeXt map.

The data flow, with VisionZip as the paper applies it (its Table 14)::

    image (S_aux x S_aux, e.g. 768) --> ConvNeXt --> map (C_aux, S_aux/4, S_aux/4) --.
       `-- resized (bilinear) to CLIP's S (336) --> CLIP --> [CLS] + N patch tokens --> mining --> VisionZip
                                                    `-- scores, keys at the select layer ----------^
       --> projector --> LLM (dominant + contextual tokens)

The mining runs before the compression: it is defined on the full grid (patch i reads the ConvNeXt pixels under
patch i), which a merged contextual token no longer has; the merge is linear, so mining first equals merging the
patches and, alike, what each mined, and the LLM still sees exactly the budget. The [CLS] token, which VisionZip
always keeps and vanilla Mini-Gemini never shows the LLM, has no region and passes unmined.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPImageProcessorPil, LlamaPreTrainedModel

from llava.model.hub import local_checkpoint
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM, LlavaLlamaModel
from llava.model.llava_arch import ImagesInput, _as_views
from llava.model.mini_gemini.config import MiniGeminiConfig
from llava.model.mini_gemini.convnext import ConvNeXtAuxTower
from llava.model.mini_gemini.mining import KEY, QUERY, VALUE, mine_patches, mining_projector
from llava.model.projector import build_vision_projector
from llava.model.vision_tower import CLIPVisionTower
from visionzip import VisionZipConfig, compress

logger = logging.getLogger(__name__)

AUX_PREFIX = "model.vision_tower_aux."
# The released config.json files name the towers by the training machine's folders (model_zoo/OpenAI/<name>);
# where no such folder exists, the same towers are read from the hub.
RELEASED_TOWERS = {
    "clip-vit-large-patch14-336": "openai/clip-vit-large-patch14-336",
    "openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup": (
        "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
    ),
}


def tower_location(name: str) -> str:
    """A tower folder as config.json names it; for a released ``model_zoo/...`` folder absent here, its hub id."""
    if Path(name).exists():
        return name
    hub = RELEASED_TOWERS.get(Path(name).name)
    if hub is not None and hub != name:
        logger.info("tower %s is not a folder here: reading %s from the hub cache", name, hub)
        return hub
    return name


class MiniGeminiCLIPTower(CLIPVisionTower):
    """LLaVA's CLIP tower whose preprocessor gives the high-resolution image (``image_size_aux``) that both towers
    start from; the model resizes it to CLIP's side (:meth:`clip_pixels`)."""

    def __init__(self, tower_name: str, image_size_aux: int, select_layer: int, select_feature: str,
                 attn_implementation: str | None) -> None:  # fmt: skip
        super().__init__(tower_name, select_layer, select_feature, attn_implementation)
        self.image_size_aux = image_size_aux

    def image_processor(self) -> CLIPImageProcessorPil:
        """The tower's preprocessor (mean, std, resampling) at ``image_size_aux``, as Mini-Gemini's eval sets it."""
        side = self.image_size_aux
        return CLIPImageProcessorPil.from_pretrained(
            local_checkpoint(self.tower_name, weights=False),
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
        )

    def clip_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S_aux, S_aux) -> (B, 3, S, S): bilinear, as Mini-Gemini derives CLIP's input from the large image."""
        side = self.config.image_size
        if images.shape[-2:] != (self.image_size_aux, self.image_size_aux):
            raise ValueError(
                f"Mini-Gemini expects images of image_size_aux = {self.image_size_aux} pixels a side (its image "
                f"processor's), got {tuple(images.shape[-2:])}"
            )
        return F.interpolate(images.float(), size=(side, side), mode="bilinear", align_corners=False).to(images.dtype)


class MiniGeminiLlamaModel(LlavaLlamaModel):
    """``LlavaLlamaModel`` plus ``vision_tower_aux`` (the ConvNeXt) and the three ``vlm_uni_*_projector``."""

    config_class = MiniGeminiConfig

    def init_multimodal(self, config: MiniGeminiConfig) -> None:
        config.check_mini_gemini()
        self.vision_tower = MiniGeminiCLIPTower(
            tower_location(config.mm_vision_tower), config.image_size_aux, config.mm_vision_select_layer,
            config.mm_vision_select_feature, getattr(config, "_attn_implementation", None),
        )  # fmt: skip
        self.vision_tower_aux = ConvNeXtAuxTower(tower_location(config.mm_vision_tower_aux))
        hidden = config.mm_hidden_size or self.vision_tower.hidden_size
        hidden_aux = config.mm_hidden_size_aux or self.vision_tower_aux.hidden_size
        if hidden_aux != self.vision_tower_aux.hidden_size:
            raise ValueError(
                f"mm_hidden_size_aux is {hidden_aux} but the ConvNeXt in {config.mm_vision_tower_aux} stacks "
                f"{self.vision_tower_aux.hidden_size} channels ({'+'.join(map(str, self.vision_tower_aux.dims))})"
            )
        self.mm_projector = build_vision_projector(config.mm_projector_type, hidden, config.hidden_size)
        setattr(self, QUERY, mining_projector(hidden, hidden))
        setattr(self, KEY, mining_projector(hidden_aux, hidden))
        setattr(self, VALUE, mining_projector(hidden_aux, hidden))


class MiniGeminiLlamaForCausalLM(LlavaLlamaForCausalLM):
    """Released ``MGMLlamaForCausalLM`` checkpoints (``model_type: mgm``); LLaVA's forward, generate and VisionZip
    switch, with the mining between the CLIP tokens and the projector."""

    config_class = MiniGeminiConfig
    tower_prefixes = ("model.vision_tower.", AUX_PREFIX)  # each is in the weights whole, or loaded from its folder

    def __init__(self, config: MiniGeminiConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = MiniGeminiLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_vision_tower_aux(self) -> ConvNeXtAuxTower:
        return self.model.vision_tower_aux

    def load_missing_towers(self, missing_keys, dtype: torch.dtype | None = None) -> None:
        """Read the ConvNeXt from ``mm_vision_tower_aux`` when the weights carry none (the builder checked that
        they carry all of it or none); either way it is frozen, as the CLIP tower (nothing here tunes it)."""
        aux = self.get_vision_tower_aux()
        if any(key.startswith(AUX_PREFIX) for key in missing_keys):
            aux.load_pretrained(dtype=dtype)
        aux.requires_grad_(False)

    def mine(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """(B, N, C) CLIP patch tokens + (B, 3, S_aux, S_aux) images -> (B, N, C) mined tokens."""
        aux = self.get_vision_tower_aux()
        trains = any(p.requires_grad for p in aux.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            aux_map = aux(images)  # (B, C_aux, S_aux / 4, S_aux / 4)
        inner = self.model
        return mine_patches(tokens, aux_map, getattr(inner, QUERY), getattr(inner, KEY), getattr(inner, VALUE))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S_aux, S_aux) -> (B, N, C_llm): CLIP on the resized image, mining, projector."""
        tower = self.get_vision_tower()
        return self.model.mm_projector(self.mine(tower(tower.clip_pixels(images)), images))

    def image_tokens(self, images: ImagesInput, image_sizes: list | None = None, instructions=None) -> list:
        """As LLaVA's (one :class:`ImageTokens` per image); refuses images of several views."""
        views = _as_views(images)
        many = [v.shape[0] for v in views if v.shape[0] != 1]
        if many:
            raise ValueError(f"Mini-Gemini takes one view per image, got images of {many} views")
        if getattr(self.config, "token_selection", None):
            raise ValueError("the encoder-side token selections are not wired into Mini-Gemini's mining")
        return super().image_tokens(images, image_sizes, instructions)

    def _visionzip_views(self, views: list[torch.Tensor], cfg: VisionZipConfig) -> list[tuple]:
        """Per image (one view each): projected tokens (1, K, C_llm), keep (1, D), the config.

        One CLIP pass gives features, [CLS] scores and keys; the patches are mined on the full grid, then
        compressed with CLIP's scores and keys (see the module docstring for the order).
        """
        images = torch.cat(views)  # (B, 3, S_aux, S_aux)
        view_cfg = self._view_config(cfg, 1)
        tower = self.get_vision_tower()
        pixels = tower.clip_pixels(images).to(tower.dtype)
        with tower._grad_mode():
            seen = tower.capture_visionzip(pixels, view_cfg)
        prefix = seen.features.shape[1] - tower.num_patches_per_side**2  # the [CLS] row
        features = torch.cat([seen.features[:, :prefix], self.mine(seen.features[:, prefix:], images)], dim=1)
        tokens, keep = compress(features, seen.scores, seen.keys, view_cfg, content=pixels)  # (B, K, C), (B, D)
        projected = self.model.mm_projector(tokens)  # (B, K, C_llm)
        return [(p.unsqueeze(0), k.unsqueeze(0), view_cfg) for p, k in zip(projected, keep, strict=True)]
