"""VisionZip (CVPR 2025): keep a few dominant and contextual visual tokens, in pure torch."""

from visionzip.config import PAPER_SPLITS, VisionZipConfig
from visionzip.core import compress, merge_contextual, select_dominant
from visionzip.encode import Captured, EncodeOutput, capture, encode, run_to_layer

__all__ = [
    "PAPER_SPLITS",
    "Captured",
    "EncodeOutput",
    "VisionZipConfig",
    "capture",
    "compress",
    "encode",
    "merge_contextual",
    "run_to_layer",
    "select_dominant",
]
