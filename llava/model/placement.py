"""Where a model goes and in which dtype: the one place that reads the device strings users pass.

Every entry point (the builder, ``run_llava``, the CLI, the lmms-eval plugins under ``accelerate launch``, the
benchmarks) passes its ``--device`` here, so ``cuda``, ``cuda:3`` and ``auto`` mean the same everywhere: our LLaVA
through :func:`llava.model.builder.load_pretrained_model`, transformers' families (llava-hf, Qwen2-VL, Video-LLaVA)
through :func:`load_placed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# LLaVA's inference default: half precision on an accelerator, full precision on the CPU.
DEFAULT_DTYPES: dict[str, torch.dtype] = {"cuda": torch.float16, "mps": torch.float16, "xpu": torch.float16}
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}  # fmt: skip
DTYPE_CHOICES = ("float32", "float16", "bfloat16")  # the canonical names command lines offer
# transformers' attention implementations our models and towers run with (``attn_implementation``); sdpa first:
# the default of every command line that offers a choice
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class Placement:
    """The resolved placement of one model.

    ``device``: where the model (or, with ``device_map="auto"``, its first shard) lives and inputs go;
    ``device_map``: what ``from_pretrained`` receives (None: load in place on the CPU); ``dtype``: its weights' dtype.
    """

    device: torch.device
    device_map: Any
    dtype: torch.dtype

    def load_kwargs(self) -> dict[str, Any]:
        """``device_map`` (only where one is needed: it requires accelerate) and ``dtype`` for ``from_pretrained``."""
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        return kwargs


def parse_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None: the first CUDA device if there is one, else the CPU; anything else as torch reads it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' (or another torch device); got {device!r}"
        ) from err


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a dtype or a name (``float16``, ``bf16``, ...); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}; got {dtype!r}")
    return DTYPE_NAMES[dtype]


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on an accelerator (whatever its index), float32 on the CPU."""
    return DEFAULT_DTYPES.get(device.type, torch.float32)


def resolve_placement(
    device: str | torch.device | None = "auto", device_map: Any = "auto", dtype: str | torch.dtype | None = None
) -> Placement:
    """Device, device_map and dtype for a device string as users write it.

    - ``cpu``: loaded in place, float32.
    - ``cuda`` (no index) or ``auto`` on a GPU machine: ``device_map`` as given (default ``"auto"``: spread over the
      visible GPUs), float16.
    - ``cuda:N`` (what ``accelerate launch`` gives each process): the whole model on that GPU, float16.
    An explicit ``dtype`` always wins; a ``device_map`` dict is kept as given.
    """
    where = parse_device(device)
    chosen = parse_dtype(dtype) or default_dtype(where)
    if isinstance(device_map, dict):
        return Placement(where, device_map, chosen)
    if where.type == "cpu":
        return Placement(where, None, chosen)
    if where.index is None and device_map is not None:
        return Placement(where, device_map, chosen)
    return Placement(where, {"": str(where)}, chosen)


def load_placed(
    model_class: type, path: str | Path, device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None, **kwargs: Any,
) -> Any:  # fmt: skip
    """``model_class.from_pretrained(path, **kwargs)`` placed as :func:`resolve_placement` reads ``device`` and
    ``dtype`` (``cuda``: every visible GPU, ``cuda:N``: that one, ``cpu``: in place; float16 on an accelerator,
    float32 on the CPU unless ``dtype`` says), in eval mode: the loader of transformers' model families."""
    placement = resolve_placement(device, dtype=dtype)
    return model_class.from_pretrained(str(path), **kwargs, **placement.load_kwargs()).eval()
