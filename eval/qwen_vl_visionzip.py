"""The lmms-eval models ``qwen2_vl_visionzip`` / ``qwen2_5_vl_visionzip`` / ``qwen3_vl_visionzip`` /
``qwen3_5_visionzip``: transformers' Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE) and Qwen3.5(-MoE) with VisionZip
(``visionzip.hf.qwen2_vl``, ``visionzip.hf.qwen3_vl``), answering through :class:`eval.hf_runner.HfLlavaRunner`.

Usage (registered through the ``lmms_eval.models`` entry point, see ``eval.plugin``)::

    python -m lmms_eval --model qwen2_5_vl_visionzip \
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,retention=0.7 --tasks mme,ocrbench --batch_size 8

Model args: :class:`eval.options.ModelOptions`' ``visionzip=off``, ``dominant``+``contextual`` (counts per image /
video frame group), ``merge``, ``selection``, ``device``, ``dtype``, ``attn_implementation``, ``batch_size``,
``greedy``, ``max_new_tokens``; plus :class:`QwenOptions`' ``retention`` (0.7 = 65% + 5%, 0.5 = 45% + 5%, the
released split), ``dominant_ratio``+``contextual_ratio``, ``min_pixels``, ``max_pixels`` (the image processor's).
Every name loads any of these families: the class follows the checkpoint config's ``model_type``. Images only
(transformers' video processors need torchvision, and lmms-eval's video docs are not read here).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, fields
from typing import Any

from transformers import AutoConfig

from eval.hf_runner import HfFamily, HfLlavaRunner
from eval.llava_visionzip import LlavaVisionZip
from eval.options import ModelOptions
from llava.model.placement import load_placed
from visionzip.hf.qwen2_vl import (
    QwenVisionZipConfig,
    VisionZipQwen2_5_VLForConditionalGeneration,
    VisionZipQwen2_5_VLProcessor,
    VisionZipQwen2VLForConditionalGeneration,
    VisionZipQwen2VLProcessor,
)
from visionzip.hf.qwen3_vl import (
    VisionZipQwen3_5ForConditionalGeneration,
    VisionZipQwen3_5MoeForConditionalGeneration,
    VisionZipQwen3VLForConditionalGeneration,
    VisionZipQwen3VLMoeForConditionalGeneration,
    VisionZipQwen3VLProcessor,
)

logger = logging.getLogger(__name__)

FAMILIES = {
    "qwen2_vl": HfFamily(VisionZipQwen2VLForConditionalGeneration, VisionZipQwen2VLProcessor),
    "qwen2_5_vl": HfFamily(VisionZipQwen2_5_VLForConditionalGeneration, VisionZipQwen2_5_VLProcessor),
    "qwen3_vl": HfFamily(VisionZipQwen3VLForConditionalGeneration, VisionZipQwen3VLProcessor),
    "qwen3_vl_moe": HfFamily(VisionZipQwen3VLMoeForConditionalGeneration, VisionZipQwen3VLProcessor),
    "qwen3_5": HfFamily(VisionZipQwen3_5ForConditionalGeneration, VisionZipQwen3VLProcessor),
    "qwen3_5_moe": HfFamily(VisionZipQwen3_5MoeForConditionalGeneration, VisionZipQwen3VLProcessor),
}
# ModelOptions of our LLaVA (its loader, [CLS], layers, LLaVA's budget split and position modes), not Qwen's
_LLAVA_ONLY = ("model_base", "conv_template", "budget", "visionzip_budget", "cls_token", "layer", "score_layer",
               "positions")  # fmt: skip


@dataclass(frozen=True)
class QwenOptions:
    """The Qwen model args beside :class:`ModelOptions`: a budget as fractions, and the image processor's pixels."""

    retention: float | None = None
    dominant_ratio: float | None = None
    contextual_ratio: float | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if (self.dominant_ratio is None) != (self.contextual_ratio is None):
            raise ValueError("model_args dominant_ratio and contextual_ratio must be given together")
        if self.retention is not None and self.dominant_ratio is not None:
            raise ValueError("model_args: give either retention or dominant_ratio+contextual_ratio, not both")

    @classmethod
    def split_kwargs(cls, kwargs: dict[str, Any]) -> tuple[QwenOptions, dict[str, Any]]:
        """(these options, the remaining model args for :meth:`ModelOptions.from_kwargs`)."""
        names = {f.name for f in fields(cls)}
        ours = {k: v for k, v in kwargs.items() if k in names and v not in (None, "")}
        for name in ("min_pixels", "max_pixels"):
            if name in ours:
                ours[name] = int(ours[name])
        for name in ("retention", "dominant_ratio", "contextual_ratio"):
            if name in ours:
                ours[name] = float(ours[name])
        return cls(**ours), {k: v for k, v in kwargs.items() if k not in names}

    def given(self) -> list[str]:
        """The budget args given."""
        return [n for n in ("retention", "dominant_ratio", "contextual_ratio") if getattr(self, n) is not None]


def requested_budget(
    options: ModelOptions, qwen: QwenOptions, saved: QwenVisionZipConfig | None
) -> QwenVisionZipConfig | None:
    """The budget the args ask for on a checkpoint that saves ``saved``; None: VisionZip off (or none asked/saved).

    ``merge``/``selection`` apply to the budget given, else to the saved one; alone they are an error.
    """
    extra = {k: getattr(options, k) for k in ("merge", "selection") if getattr(options, k) is not None}
    if options.visionzip == "off":
        if qwen.given():
            raise ValueError(f"model_args visionzip=off turns VisionZip off: expected none of {qwen.given()}")
        return None
    if qwen.retention is not None:
        return QwenVisionZipConfig.from_retention(qwen.retention, **extra)
    if qwen.dominant_ratio is not None:
        return QwenVisionZipConfig(qwen.dominant_ratio, qwen.contextual_ratio, **extra)
    if options.dominant is not None:
        return QwenVisionZipConfig(options.dominant, options.contextual, **extra)
    if saved is not None:
        return dataclasses.replace(saved, **extra)
    if extra:
        raise ValueError(f"model_args {sorted(extra)} change a VisionZip budget, but none is given or saved")
    return None


def load_qwen_runner(options: ModelOptions, qwen: QwenOptions, device: str, model_name: str) -> HfLlavaRunner:
    """The checkpoint in its VisionZip class (by ``model_type``) with the asked budget, and its processor."""
    given = [name for name in _LLAVA_ONLY if getattr(options, name) is not None]
    if given:
        raise ValueError(f"model_args {given} apply to our LLaVA, not {model_name}")
    model_type = AutoConfig.from_pretrained(options.pretrained).model_type
    if model_type not in FAMILIES:
        raise ValueError(f"{model_name} runs model_type {sorted(FAMILIES)}; {options.pretrained} is {model_type!r}")
    family = FAMILIES[model_type]
    attn = options.attn_implementation
    model = load_placed(family.model_class, options.pretrained, device, options.torch_dtype, attn_implementation=attn)
    model.set_visionzip(requested_budget(options, qwen, model.visionzip_config))
    processor = family.processor_class.from_pretrained(options.pretrained, visionzip=model.visionzip_config)
    set_pixel_range(processor.image_processor, qwen.min_pixels, qwen.max_pixels)
    logger.info("%s: %s (%s) on %s, VisionZip %s", model_name, options.pretrained, model_type, device,
                model.visionzip_config)  # fmt: skip
    return HfLlavaRunner(model, processor, options.greedy, options.max_new_tokens)


def set_pixel_range(image_processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """The image processor's pixel range (``size.shortest_edge``/``longest_edge`` hold min/max pixels)."""
    changes = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes:
        image_processor.size = dataclasses.replace(image_processor.size, **changes)


class QwenVLVisionZip(LlavaVisionZip):
    """``llava_visionzip``'s batching, ``generate_until`` and ``loglikelihood`` on a Qwen2-VL / Qwen2.5-VL runner."""

    model_name = "qwen2_5_vl_visionzip"

    def __init__(self, pretrained: str, **model_args: Any) -> None:
        self.qwen, rest = QwenOptions.split_kwargs(model_args)
        super().__init__(pretrained, **rest)

    def load_runner(self, options: ModelOptions, device: str) -> HfLlavaRunner:
        return load_qwen_runner(options, self.qwen, device, self.model_name)


class Qwen2VLVisionZip(QwenVLVisionZip):
    """The same model under the name ``qwen2_vl_visionzip``."""

    model_name = "qwen2_vl_visionzip"


class Qwen3VLVisionZip(QwenVLVisionZip):
    """The same model under the name ``qwen3_vl_visionzip`` (Qwen3-VL and Qwen3-VL-MoE checkpoints)."""

    model_name = "qwen3_vl_visionzip"


class Qwen3_5VisionZip(QwenVLVisionZip):
    """The same model under the name ``qwen3_5_visionzip`` (Qwen3.5 and Qwen3.5-MoE checkpoints)."""

    model_name = "qwen3_5_visionzip"
