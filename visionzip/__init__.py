"""VisionZip (CVPR 2025): keep a few dominant and contextual visual tokens; the core imports only torch."""

from visionzip.config import PAPER_SPLITS, VisionZipConfig
from visionzip.core import (
    Selection,
    compress,
    contextual_targets,
    merge_contextual,
    select,
    select_dominant,
    token_positions,
)
from visionzip.encode import Captured, EncodeOutput, capture, encode, run_to_layer

__all__ = [
    "PAPER_SPLITS",
    "Captured",
    "EncodeOutput",
    "Selection",
    "VisionZipConfig",
    "capture",
    "compress",
    "contextual_targets",
    "encode",
    "merge_contextual",
    "run_to_layer",
    "select",
    "select_dominant",
    "token_positions",
]
