"""Tiny random Mini-Gemini (MGM) checkpoints in the released on-disk layout, for CPU tests.

A released MGM-7B folder is a LLaVA-1.5 folder whose config.json says ``model_type: mgm`` and names a second tower
(``mm_vision_tower_aux``: an OpenCLIP ConvNeXt folder with ``open_clip_config.json`` and
``open_clip_pytorch_model.bin``, keys ``visual.trunk.{stem,stages}.*`` as timm names them), and whose weights add
``model.vlm_uni_{query,aux,val}_projector.{0,1}.{weight,bias}`` (LayerNorm, Linear). The key names below are
written out by hand from that layout, not taken from our model, so a loader that names them differently fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava.tiny import TinyConfig, write_tiny_llava

CONVNEXT_DIR = "convnext"


@dataclass(frozen=True)
class TinyMGM:
    """Sizes of the tiny ConvNeXt and of the high-resolution image (the CLIP side comes from TinyConfig)."""

    depths: tuple[int, ...] = (1, 2, 1, 1)
    dims: tuple[int, ...] = (8, 16, 16, 24)
    image_size_aux: int = 128  # 4x CLIP's 64: a 32x32 ConvNeXt map, 4x4 pixels under each of the 8x8 patches
    mlp_ratio: int = 4
    kernel: int = 7
    stem: int = 4


def _rand(generator: torch.Generator, *shape: int, scale: float = 0.2, centre: float = 0.0) -> torch.Tensor:
    return centre + scale * torch.randn(*shape, generator=generator)


def trunk_tensors(mgm: TinyMGM, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The ConvNeXt trunk under timm's names (``stem.*``, ``stages.{s}.downsample.*``, ``stages.{s}.blocks.{b}.*``)."""
    d0 = mgm.dims[0]
    out = {
        "stem.0.weight": _rand(generator, d0, 3, mgm.stem, mgm.stem), "stem.0.bias": _rand(generator, d0),
        "stem.1.weight": _rand(generator, d0, centre=1.0), "stem.1.bias": _rand(generator, d0),
    }  # fmt: skip
    previous = d0
    for s, (depth, dim) in enumerate(zip(mgm.depths, mgm.dims, strict=True)):
        stage = f"stages.{s}."
        if s > 0:  # stage 0 keeps the stem's resolution and channels: no downsample
            out[stage + "downsample.0.weight"] = _rand(generator, previous, centre=1.0)
            out[stage + "downsample.0.bias"] = _rand(generator, previous)
            out[stage + "downsample.1.weight"] = _rand(generator, dim, previous, 2, 2)
            out[stage + "downsample.1.bias"] = _rand(generator, dim)
        for b in range(depth):
            block = f"{stage}blocks.{b}."
            hidden = mgm.mlp_ratio * dim
            out |= {
                block + "conv_dw.weight": _rand(generator, dim, 1, mgm.kernel, mgm.kernel),
                block + "conv_dw.bias": _rand(generator, dim),
                block + "norm.weight": _rand(generator, dim, centre=1.0), block + "norm.bias": _rand(generator, dim),
                block + "mlp.fc1.weight": _rand(generator, hidden, dim),
                block + "mlp.fc1.bias": _rand(generator, hidden),
                block + "mlp.fc2.weight": _rand(generator, dim, hidden), block + "mlp.fc2.bias": _rand(generator, dim),
                block + "gamma": _rand(generator, dim, scale=0.1, centre=0.5),  # layer scale, large enough to matter
            }  # fmt: skip
        previous = dim
    return out


def write_convnext_folder(folder: Path, mgm: TinyMGM, seed: int, fmt: str = "bin") -> Path:
    """An OpenCLIP ConvNeXt folder: open_clip_config.json and the whole CLIP's weights (text tower and head too)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    state = {f"visual.trunk.{k}": v for k, v in trunk_tensors(mgm, generator).items()}
    state["visual.trunk.head.norm.weight"] = torch.ones(mgm.dims[-1])  # unused by Mini-Gemini (it drops the head)
    state["visual.head.mlp.fc1.weight"] = _rand(generator, 8, mgm.dims[-1])
    state["text.token_embedding.weight"] = _rand(generator, 16, 8)
    state["logit_scale"] = torch.tensor(4.6)
    config = {
        "model_cfg": {
            "embed_dim": 8,
            # timm_model_name as the released folder names its trunk; depths and dims: the tiny trunk's shape
            "vision_cfg": {"timm_model_name": "convnext_tiny_random", "depths": list(mgm.depths),
                           "dims": list(mgm.dims), "timm_pool": "", "timm_proj": "mlp",
                           "image_size": mgm.image_size_aux},
            "text_cfg": {"context_length": 77, "vocab_size": 16, "width": 8, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }  # fmt: skip
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    if fmt == "bin":
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    else:
        save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def _mining_tensors(hidden: int, hidden_aux: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, width in (("query", hidden), ("aux", hidden_aux), ("val", hidden_aux)):
        prefix = f"model.vlm_uni_{name}_projector."
        out[prefix + "0.weight"] = _rand(generator, width, centre=1.0)
        out[prefix + "0.bias"] = _rand(generator, width)
        out[prefix + "1.weight"] = _rand(generator, hidden, width, scale=1.0 / width**0.5)
        out[prefix + "1.bias"] = _rand(generator, hidden)
    return out


def write_tiny_mgm(root: Path, mgm: TinyMGM | None = None, seed: int = 0, aux_in_weights: bool = False) -> Path:
    """A tiny MGM checkpoint in ``root/mgm-tiny`` (ConvNeXt in ``root/convnext``); returns the checkpoint folder.

    ``aux_in_weights``: the checkpoint carries a tuned ConvNeXt (``model.vision_tower_aux.vision_{stem,stages}.*``,
    the folder's trunk plus noise, as ``optimize_vision_tower_aux=True`` training saves it).
    """
    mgm = mgm or TinyMGM()
    cfg = TinyConfig()
    llava = write_tiny_llava(root / "llava", next=False, seed=seed, cfg=cfg)
    ckpt = root / "mgm-tiny"
    ckpt.mkdir(parents=True, exist_ok=True)
    for f in llava.iterdir():
        if f.is_file():
            (ckpt / f.name).write_bytes(f.read_bytes())
    aux = write_convnext_folder(root / CONVNEXT_DIR, mgm, seed + 1)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(
        architectures=["MGMLlamaForCausalLM"], model_type="mgm", mm_vision_tower_aux=str(aux.resolve()),
        mm_hidden_size_aux=sum(mgm.dims), image_size_aux=mgm.image_size_aux, image_grid=1, image_global=False,
        optimize_vision_tower=False, optimize_vision_tower_aux=aux_in_weights, image_aspect_ratio="pad",
    )  # fmt: skip
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    state = load_file(str(ckpt / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed + 2)
    state.update(_mining_tensors(cfg.vision_hidden_size, sum(mgm.dims), generator))
    if aux_in_weights:
        names = {"stem.": "vision_stem.", "stages.": "vision_stages."}
        for key, value in trunk_tensors(mgm, torch.Generator().manual_seed(seed + 1)).items():
            local = next(new + key.removeprefix(old) for old, new in names.items() if key.startswith(old))
            state["model.vision_tower_aux." + local] = value + 0.05 * torch.randn(value.shape, generator=generator)
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return ckpt
