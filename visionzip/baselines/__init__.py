"""The methods VisionZip is compared with, as pure functions and frozen configs (scores -> kept tokens)."""

from visionzip.baselines.budget import layer_average, visual_counts
from visionzip.baselines.fastv import FastVConfig, fastv_keep_for_average
from visionzip.baselines.pdrop import PDropConfig
from visionzip.baselines.prune import PruneConfig, keep_top_per_image, method_config
from visionzip.baselines.scores import head_mean_attention, rotate
from visionzip.baselines.sparsevlm import SparseVLMConfig

__all__ = [
    "FastVConfig",
    "PDropConfig",
    "PruneConfig",
    "SparseVLMConfig",
    "fastv_keep_for_average",
    "head_mean_attention",
    "keep_top_per_image",
    "layer_average",
    "method_config",
    "rotate",
    "visual_counts",
]
