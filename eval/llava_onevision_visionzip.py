"""The lmms-eval model ``llava_onevision_visionzip``: llava-hf LLaVA-OneVision checkpoints in transformers' class with
VisionZip (``visionzip.hf.llava_onevision``), the model args of ``llava_visionzip``; images only.

    python -m lmms_eval --model llava_onevision_visionzip \
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,budget=64 --tasks mme --batch_size 8

SigLIP has no [CLS]: a budget scores tokens by the attention they receive (``cls_token=false`` unless given) at the
checkpoint's ``vision_feature_layer`` (-1). The budget is per view (anyres_max_9 crops) of a single image; a prompt
with several images keeps each one's base view, as the parent class. Prompts come from the checkpoint's chat template.
Video tasks are not run here (their frames need transformers' torchvision video processor and a frame reader).
"""

from __future__ import annotations

from transformers import LlavaOnevisionConfig

from eval.hf_runner import HfFamily, HfLlavaRunner
from eval.llava_visionzip import LlavaVisionZip
from eval.options import ModelOptions
from visionzip.hf.llava_onevision import (
    VisionZipLlavaOnevisionForConditionalGeneration,
    VisionZipLlavaOnevisionProcessor,
)

FAMILIES = {
    LlavaOnevisionConfig.model_type: HfFamily(
        VisionZipLlavaOnevisionForConditionalGeneration, VisionZipLlavaOnevisionProcessor
    ),
}


class LlavaOnevisionVisionZip(LlavaVisionZip):
    """``llava_visionzip``'s batching, ``generate_until`` and ``loglikelihood`` on :class:`HfLlavaRunner`."""

    model_name = "llava_onevision_visionzip"

    def load_runner(self, options: ModelOptions, device: str) -> HfLlavaRunner:
        return HfLlavaRunner.load(options, device, FAMILIES, self.model_name)
