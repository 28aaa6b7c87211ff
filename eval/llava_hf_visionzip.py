"""The lmms-eval model ``llava_hf_visionzip``: llava-hf LLaVA-1.5 / LLaVA-NeXT checkpoints in transformers' classes
with VisionZip (``visionzip.hf.llava``, ``visionzip.hf.llava_next``), the model args of ``llava_visionzip``.

Usage (found through the ``lmms_eval.models`` entry point, see ``eval.plugin``)::

    python -m lmms_eval --model llava_hf_visionzip \
        --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,budget=64 --tasks gqa --batch_size 8

The class (``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration``) follows the checkpoint
config's ``model_type``. The budget is per view (``budget=64`` on LLaVA-NeXT: 54+10 in each of up to 5 views, the
paper's 320); without one the checkpoint's saved budget applies (an exported VisionZip‡), ``visionzip=off`` none.
``method=divprune|vispruner|cdpruner`` selects patches per view instead (``visionzip.hf.selection``); CDPruner needs
``clip_text=<full CLIP checkpoint>`` (llava-hf checkpoints hold no text tower). Prompts come from the checkpoint's
chat template; ``model_base``, ``conv_template``, ``positions=original`` and
``visionzip_budget=total`` are our LLaVA's and raise here (:func:`eval.hf_runner.check_hf_options`).
"""

from __future__ import annotations

from transformers import LlavaConfig, LlavaNextConfig

from eval.hf_runner import HfFamily, HfLlavaRunner
from eval.llava_visionzip import LlavaVisionZip
from eval.options import ModelOptions
from visionzip.hf.llava import VisionZipLlavaForConditionalGeneration, VisionZipLlavaProcessor
from visionzip.hf.llava_next import VisionZipLlavaNextForConditionalGeneration, VisionZipLlavaNextProcessor

FAMILIES = {
    LlavaConfig.model_type: HfFamily(VisionZipLlavaForConditionalGeneration, VisionZipLlavaProcessor),
    LlavaNextConfig.model_type: HfFamily(VisionZipLlavaNextForConditionalGeneration, VisionZipLlavaNextProcessor),
}


class LlavaHfVisionZip(LlavaVisionZip):
    """``llava_visionzip``'s batching, ``generate_until`` and ``loglikelihood`` on :class:`HfLlavaRunner`."""

    model_name = "llava_hf_visionzip"

    def load_runner(self, options: ModelOptions, device: str) -> HfLlavaRunner:
        return HfLlavaRunner.load(options, device, FAMILIES, self.model_name)
