"""The CLIP vision tower of LLaVA, with VisionZip as an optional stage between the encoder and the projector."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from llava.model.hub import local_checkpoint
from visionzip import Captured, VisionZipConfig, capture, compress, run_to_layer
from visionzip.hf.loading import quiet_load_report as quiet_load_report  # llava modules import it from here


class CLIPVisionTower(nn.Module):
    """Encodes images into visual tokens: LLaVA's select layer/feature, or VisionZip's compressed tokens.

    The encoder is ``self.vision_tower`` (a transformers ``CLIPVisionModel``), so checkpoint keys read
    ``model.vision_tower.vision_tower.*`` as in the released LLaVA-1.6 files.
    """

    def __init__(self, tower_name: str, select_layer: int = -2, select_feature: str = "patch",
                 attn_implementation: str | None = None) -> None:  # fmt: skip
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        self.tower_name = tower_name  # as config.json names it (a hub id stays one, so the checkpoint stays portable)
        self.select_layer = select_layer
        self.select_feature = select_feature
        config = CLIPVisionConfig.from_pretrained(local_checkpoint(tower_name, weights=False))
        config._attn_implementation = attn_implementation or "sdpa"
        self.vision_tower = CLIPVisionModel(config)
        self.vision_tower.requires_grad_(False)

    def load_pretrained(self, dtype: torch.dtype | None = None) -> None:
        """Replace the encoder with the weights of ``tower_name`` (LLaVA-1.5 checkpoints carry no tower)."""
        impl = self.vision_tower.config._attn_implementation
        device = next(self.vision_tower.parameters()).device
        with quiet_load_report():  # a full CLIP folder's text tower is "unexpected": expected here
            loaded, info = CLIPVisionModel.from_pretrained(
                local_checkpoint(self.tower_name), attn_implementation=impl, dtype=dtype, output_loading_info=True
            )
        if info.get("missing_keys"):
            raise ValueError(f"vision tower {self.tower_name} lacks weights: {sorted(info['missing_keys'])[:20]}")
        self.vision_tower = loaded.to(device).requires_grad_(False)

    def image_processor(self) -> CLIPImageProcessorPil:
        """The tower's own preprocessor (``preprocessor_config.json`` of ``tower_name``), on PIL as LLaVA's was.

        Named directly: transformers' ``CLIPImageProcessor`` is the torchvision backend, and without torchvision
        it falls back to this class with a warning.
        """
        return CLIPImageProcessorPil.from_pretrained(local_checkpoint(self.tower_name, weights=False))

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_tokens(self) -> int:
        """Encoder tokens per image: patches plus [CLS]."""
        return self.num_patches_per_side**2 + 1

    @property
    def post_layernorm(self) -> nn.Module:
        """CLIP's final LayerNorm (which LLaVA's features skip; CDPruner's image embeddings pass through it)."""
        return getattr(self.vision_tower, "vision_model", self.vision_tower).post_layernorm

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    def _grad_mode(self) -> AbstractContextManager:
        """No autograd graph through a frozen encoder (it trains in no mode here).

        Under gradient checkpointing ``enable_input_require_grads`` makes CLIP's patch embedding output require
        grad, which would keep the encoder's activations (and recompute its layers) for a backward that changes
        nothing. An encoder with a trainable parameter keeps its graph.
        """
        trains = any(p.requires_grad for p in self.vision_tower.parameters())
        return nullcontext() if trains else torch.no_grad()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """LLaVA's features: (B, 3, H, W) -> (B, N', C) of ``select_layer`` ([CLS] dropped for 'patch')."""
        with self._grad_mode():
            hidden = run_to_layer(self.vision_tower, images.to(self.dtype), self.select_layer)  # (B, N, C)
        return hidden[:, 1:] if self.select_feature == "patch" else hidden

    def capture_visionzip(self, pixels: torch.Tensor, cfg: VisionZipConfig) -> Captured:
        """What VisionZip needs from the encoder for (B, 3, H, W) ``pixels``: features, scores and keys.

        The one seam between the encoder and the compression: another way of running the encoder (the
        benchmark's released-code path) overrides it.
        """
        return capture(self.vision_tower, pixels, cfg)

    def forward_visionzip(self, images: torch.Tensor, cfg: VisionZipConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """VisionZip tokens: (B, 3, H, W) -> ((B, dominant + contextual, C), keep (B, dominant)); [CLS] is kept."""
        pixels = images.to(self.dtype)
        with self._grad_mode():
            seen = self.capture_visionzip(pixels, cfg)
            return compress(seen.features, seen.scores, seen.keys, cfg, content=pixels)  # random: per image's pixels

    def forward_patches(
        self, images: torch.Tensor, cls_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The patch features of ``select_layer`` and, with ``cls_attention``, the [CLS] row's attention to them.

        What the encoder-side selections read (VisPruner: both; DivPrune and CDPruner: the features). The [CLS] row
        comes through :meth:`capture_visionzip` (the same seam, so the benchmark's released-code path is the one
        timed), at ``select_layer``, summed over heads, without eager attention in any layer.

        Args:
            images: (B, 3, H, W).

        Returns:
            features (B, N, C) of the N patches ([CLS] dropped), and (B, N) fp32 attention or None.
        """
        if self.select_feature != "patch":
            raise ValueError(
                f"the token selections pick among the patches: mm_vision_select_feature must be 'patch', "
                f"got {self.select_feature!r}"
            )
        pixels = images.to(self.dtype)
        with self._grad_mode():
            if not cls_attention:
                return run_to_layer(self.vision_tower, pixels, self.select_layer)[:, 1:], None
            seen = self.capture_visionzip(pixels, VisionZipConfig(layer=self.select_layer))
        return seen.features[:, 1:], seen.scores[:, 1:]  # (B, N, C), (B, N)

    def forward_visionzip_images(
        self, images: torch.Tensor, sizes: list[int], cfgs: list[VisionZipConfig]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """VisionZip tokens for several images of ``sizes[i]`` views each, image i compressed with ``cfgs[i]``.

        One encoder pass for all views whatever the budgets (they differ per view count with a total budget):
        under ZeRO-3 every rank must run the same modules the same number of times. ``cfgs`` may differ only in
        their budgets (dominant, contextual); the layers and scoring come from ``cfgs[0]``.

        Args:
            images: (sum(sizes), 3, H, W).

        Returns:
            per image: tokens (V_i, dominant_i + contextual_i, C) and keep (V_i, dominant_i).
        """
        pixels = images.to(self.dtype)
        groups: dict[VisionZipConfig, list[int]] = {}
        for i, cfg in enumerate(cfgs):
            groups.setdefault(cfg, []).append(i)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        out: list = [None] * len(sizes)
        with self._grad_mode():
            seen = self.capture_visionzip(pixels, cfgs[0])
            for cfg, members in groups.items():  # one compress call per distinct budget
                rows = torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in members]).to(pixels.device)
                tokens, keep = compress(
                    seen.features[rows], seen.scores[rows], seen.keys[rows], cfg, content=pixels[rows]
                )
                member_sizes = [sizes[i] for i in members]
                for i, t, k in zip(members, tokens.split(member_sizes), keep.split(member_sizes), strict=True):
                    out[i] = (t, k)
        return out


def build_vision_tower(config, attn_implementation: str | None = None) -> CLIPVisionTower:
    """The tower named by ``config.mm_vision_tower`` (a hub id or a local CLIP directory)."""
    name = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
    if not name:
        raise ValueError("config has no mm_vision_tower: cannot build the vision tower")
    select_layer = getattr(config, "mm_vision_select_layer", -2)
    select_feature = getattr(config, "mm_vision_select_feature", "patch")
    return CLIPVisionTower(name, select_layer, select_feature, attn_implementation)
