"""Mini-Gemini's high-resolution encoder: the trunk of an OpenCLIP ConvNeXt (timm's layout), stem and four stages.

The parameter names are the released checkpoints' (``model.vision_tower_aux.vision_stem.*``,
``model.vision_tower_aux.vision_stages.{s}.downsample.*`` / ``.blocks.{b}.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}``);
the OpenCLIP folder names the same tensors ``visual.trunk.stem.*`` / ``visual.trunk.stages.*``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llava.model.hub import local_checkpoint
from llava.model.weights import read_weights_file

logger = logging.getLogger(__name__)

OPEN_CLIP_CONFIG = "open_clip_config.json"
# safetensors first (OpenCLIP's name, and the one the hub's converted LAION ConvNeXt folders carry); the .bin (what
# Mini-Gemini's own loader reads) only where no safetensors stand beside it
OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
TRUNK_PREFIX = "visual.trunk."
# OpenCLIP's trunk names -> this module's (Mini-Gemini keeps the stem and the stages under its own names)
TRUNK_RENAMES = {"stem.": "vision_stem.", "stages.": "vision_stages."}
# timm's ConvNeXt trunks that OpenCLIP configs name: (blocks per stage, channels per stage)
TIMM_CONVNEXT = {
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
STEM_STRIDE = 4  # timm's "patch" stem: a 4x4 convolution, stride 4
STAGE_STRIDE = 2  # each stage after the first halves the map
KERNEL_SIZE = 7  # depthwise convolution of every block
MLP_RATIO = 4
NORM_EPS = 1e-6  # timm's ConvNeXt LayerNorm eps
LAYER_SCALE_INIT = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class ConvNeXtMlp(nn.Module):
    """Channels-last MLP of a block: fc1 -> GELU -> fc2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, MLP_RATIO * channels)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(MLP_RATIO * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """x + gamma * mlp(norm(dwconv(x))), the norm and the MLP channels-last."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, KERNEL_SIZE, padding=KERNEL_SIZE // 2, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=NORM_EPS)
        self.mlp = ConvNeXtMlp(channels)
        self.gamma = nn.Parameter(torch.full((channels,), LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1)))  # (B, H, W, C)
        return x + (y * self.gamma).permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    """Optional downsampling (LayerNorm2d, 2x2 stride-2 convolution), then the blocks."""

    def __init__(self, in_channels: int, channels: int, depth: int, downsample: bool) -> None:
        super().__init__()
        self.downsample: nn.Module = nn.Identity()
        if downsample:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_channels, eps=NORM_EPS),
                nn.Conv2d(in_channels, channels, STAGE_STRIDE, stride=STAGE_STRIDE),
            )
        self.blocks = nn.Sequential(*(ConvNeXtBlock(channels) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def trunk_shape(folder: str | Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(depths, dims) of the ConvNeXt in an OpenCLIP folder, from ``open_clip_config.json``.

    ``model_cfg.vision_cfg.timm_model_name`` names a timm trunk (:data:`TIMM_CONVNEXT`); explicit ``depths`` and
    ``dims`` there (our tiny test towers) take precedence.
    """
    path = Path(folder) / OPEN_CLIP_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: mm_vision_tower_aux must be an OpenCLIP ConvNeXt folder")
    vision = json.loads(path.read_text()).get("model_cfg", {}).get("vision_cfg", {})
    if "depths" in vision and "dims" in vision:
        depths, dims = tuple(vision["depths"]), tuple(vision["dims"])
    elif vision.get("timm_model_name") in TIMM_CONVNEXT:
        depths, dims = TIMM_CONVNEXT[vision["timm_model_name"]]
    else:
        raise ValueError(
            f"{path}: expected model_cfg.vision_cfg.timm_model_name in {sorted(TIMM_CONVNEXT)} (or depths and dims), "
            f"got {vision.get('timm_model_name')!r}"
        )
    if len(depths) != len(dims) or not depths:
        raise ValueError(f"{path}: depths {depths} and dims {dims} must name the same (non-zero) number of stages")
    return depths, dims


class ConvNeXtAuxTower(nn.Module):
    """The ConvNeXt of ``mm_vision_tower_aux``: (B, 3, S, S) -> every stage's map at the first stage's size, stacked.

    As Mini-Gemini reads it: stage s's (B, dims[s], S/4/2^s, S/4/2^s) map is resized (bilinear) to the first
    stage's S/4 x S/4 and the four are concatenated over channels: (B, sum(dims), S/4, S/4).
    """

    def __init__(self, tower_name: str) -> None:
        super().__init__()
        self.tower_name = tower_name
        self.depths, self.dims = trunk_shape(local_checkpoint(tower_name, weights=False))
        self.vision_stem = nn.Sequential(
            nn.Conv2d(3, self.dims[0], STEM_STRIDE, stride=STEM_STRIDE), LayerNorm2d(self.dims[0], eps=NORM_EPS)
        )
        ins = (self.dims[0], *self.dims[:-1])
        self.vision_stages = nn.Sequential(
            *(
                ConvNeXtStage(i, d, n, s > 0)
                for s, (i, d, n) in enumerate(zip(ins, self.dims, self.depths, strict=True))
            )
        )
        self.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        """Channels of the stacked map (Mini-Gemini's ``mm_hidden_size_aux``)."""
        return sum(self.dims)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_stem[0].weight.dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, sum(dims), S / 4, S / 4)."""
        x = self.vision_stem(images.to(self.dtype))
        maps = []
        for stage in self.vision_stages:
            x = stage(x)
            maps.append(x)
        size = maps[0].shape[-2:]
        resized = [maps[0]] + [
            F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False).to(m.dtype) for m in maps[1:]
        ]
        return torch.cat(resized, dim=1)

    def load_pretrained(self, dtype: torch.dtype | None = None) -> None:
        """Copy the trunk of the OpenCLIP folder ``tower_name`` in (Mini-Gemini files without a tuned ConvNeXt)."""
        folder = Path(local_checkpoint(self.tower_name))
        files = [folder / name for name in OPEN_CLIP_WEIGHTS if (folder / name).is_file()]
        if not files:
            raise FileNotFoundError(f"no ConvNeXt weights in {folder}: expected one of {OPEN_CLIP_WEIGHTS}")
        state = trunk_state(read_weights_file(files[0]))
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"{files[0]} lacks ConvNeXt weights: {missing[:20]} ({len(missing)} in all)")
        target = dtype or self.dtype
        self.load_state_dict({k: state[k].to(target) for k in own}, strict=True)
        logger.info("ConvNeXt (%s) loaded from %s", "+".join(map(str, self.depths)), files[0])


def trunk_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP state dict's trunk tensors under this module's names (the text tower, head and the rest left)."""
    out = {}
    for key, value in state.items():
        if not key.startswith(TRUNK_PREFIX):
            continue
        local = key.removeprefix(TRUNK_PREFIX)
        for old, new in TRUNK_RENAMES.items():
            if local.startswith(old):
                out[new + local.removeprefix(old)] = value
    return out
