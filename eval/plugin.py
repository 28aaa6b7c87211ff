"""lmms-eval plugin registration: the ``lmms_eval.models`` entry point names ``manifests`` (see pyproject.toml).

lmms-eval (0.7.x) loads every entry point of that group when ``lmms_eval.models`` is imported and registers the
manifests it returns, so ``--model llava_visionzip`` works without a fork and without ``LMMS_EVAL_PLUGINS``.
The model module itself is imported only when the model is used.
"""

from __future__ import annotations

from typing import Any

MODEL_NAME = "llava_visionzip"
MODEL_CLASS_PATH = "eval.llava_visionzip.LlavaVisionZip"


def manifests() -> list[Any]:
    """The ``ModelManifest`` of ``llava_visionzip`` (a simple, non-chat lmms-eval model)."""
    from lmms_eval.models.registry_v2 import ModelManifest  # called by lmms-eval itself, so it is installed

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS_PATH)]
