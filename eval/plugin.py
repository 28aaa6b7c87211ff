"""lmms-eval plugin registration: the ``lmms_eval.models`` entry point names ``manifests`` (see pyproject.toml).

lmms-eval (0.7.x) loads every entry point of that group when ``lmms_eval.models`` is imported and registers the
manifests it returns, so ``--model llava_visionzip`` (our LLaVA), ``llava_hf_visionzip`` (transformers' LLaVA /
LLaVA-NeXT classes) and ``llava_onevision_visionzip`` work without a fork and without ``LMMS_EVAL_PLUGINS``. A
model's module is imported only when the model is used.
"""

from __future__ import annotations

from typing import Any

MODEL_NAME = "llava_visionzip"
MODEL_CLASS_PATH = "eval.llava_visionzip.LlavaVisionZip"
# lmms-eval name -> class path; every model takes the model args of eval.options.ModelOptions
MODELS = {
    MODEL_NAME: MODEL_CLASS_PATH,
    "llava_hf_visionzip": "eval.llava_hf_visionzip.LlavaHfVisionZip",
    "llava_onevision_visionzip": "eval.llava_onevision_visionzip.LlavaOnevisionVisionZip",
    "video_llava_visionzip": "eval.video_llava_visionzip.VideoLlavaVisionZip",  # plus eval.video_runner.VideoOptions
    "qwen2_vl_visionzip": "eval.qwen_vl_visionzip.Qwen2VLVisionZip",  # plus eval.qwen_vl_visionzip.QwenOptions
    "qwen2_5_vl_visionzip": "eval.qwen_vl_visionzip.QwenVLVisionZip",
    "qwen3_vl_visionzip": "eval.qwen_vl_visionzip.Qwen3VLVisionZip",
    "qwen3_5_visionzip": "eval.qwen_vl_visionzip.Qwen3_5VisionZip",
}
# the lmms-eval models that run the encoder-side selections (method=divprune|vispruner|cdpruner)
SELECTION_MODELS = (MODEL_NAME, "llava_hf_visionzip")
# the lmms-eval models that run the in-LLM methods (method=fastv|pdrop|sparsevlm: an owned decoder loop)
IN_LLM_MODELS = (MODEL_NAME, "llava_hf_visionzip", "video_llava_visionzip")
# lmms-eval name -> class path of its model args beyond ModelOptions (``split_kwargs(args) -> (options, rest)``)
EXTRA_OPTIONS = {
    "qwen2_vl_visionzip": "eval.qwen_vl_visionzip.QwenOptions",
    "qwen2_5_vl_visionzip": "eval.qwen_vl_visionzip.QwenOptions",
    "qwen3_vl_visionzip": "eval.qwen_vl_visionzip.QwenOptions",
    "qwen3_5_visionzip": "eval.qwen_vl_visionzip.QwenOptions",
    "video_llava_visionzip": "eval.video_runner.VideoOptions",
}


def manifests() -> list[Any]:
    """The ``ModelManifest`` of each model (simple, non-chat lmms-eval models)."""
    from lmms_eval.models.registry_v2 import ModelManifest  # called by lmms-eval itself, so it is installed

    return [ModelManifest(model_id=name, simple_class_path=path) for name, path in MODELS.items()]
