"""The methods VisionZip is compared with, as pure functions and frozen configs (scores -> kept tokens)."""

from visionzip.baselines.budget import layer_average, visual_counts
from visionzip.baselines.cdpruner import CDPrunerConfig, cdpruner_kernel, cdpruner_relevance, cdpruner_select
from visionzip.baselines.divprune import DivPruneConfig, divprune_select
from visionzip.baselines.fastv import FastVConfig, fastv_keep_for_average
from visionzip.baselines.pdrop import PDropConfig
from visionzip.baselines.prune import PruneConfig, keep_top_per_image, method_config
from visionzip.baselines.scores import head_mean_attention, rotate
from visionzip.baselines.sparsevlm import SparseVLMConfig
from visionzip.baselines.vispruner import VisPrunerConfig, vispruner_select

__all__ = [
    "CDPrunerConfig",
    "DivPruneConfig",
    "FastVConfig",
    "PDropConfig",
    "PruneConfig",
    "SparseVLMConfig",
    "VisPrunerConfig",
    "cdpruner_kernel",
    "cdpruner_relevance",
    "cdpruner_select",
    "divprune_select",
    "fastv_keep_for_average",
    "head_mean_attention",
    "keep_top_per_image",
    "layer_average",
    "method_config",
    "rotate",
    "vispruner_select",
    "visual_counts",
]
