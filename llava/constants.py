"""Token ids and placeholder strings shared by the data pipeline, the model and evaluation (LLaVA's values)."""

from __future__ import annotations

IGNORE_INDEX: int = -100  # label ignored by torch's cross-entropy loss
IMAGE_TOKEN_INDEX: int = -200  # placeholder id, replaced by image features before the language model

DEFAULT_IMAGE_TOKEN: str = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN: str = "<im_patch>"
DEFAULT_IM_START_TOKEN: str = "<im_start>"
DEFAULT_IM_END_TOKEN: str = "<im_end>"
IMAGE_PLACEHOLDER: str = "<image-placeholder>"
