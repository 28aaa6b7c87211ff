"""What the encoder-side comparison methods share: one config type, reloading from ``config.json``, and one call that
picks each view's kept patches from whatever the method reads (spec sections 5-7).

DivPrune, VisPruner and CDPruner act where VisionZip does, between the vision encoder and the language model, and
keep ``tokens`` patches per view (per crop on AnyRes) in raster order with contiguous positions. Unlike VisionZip
they merge nothing, so the model's input is a gather of the projected patches at the kept positions.
"""

from __future__ import annotations

from typing import Any

import torch

from visionzip.baselines.cdpruner import CDPrunerConfig, cdpruner_select
from visionzip.baselines.divprune import DivPruneConfig, check_keep, divprune_select
from visionzip.baselines.vispruner import VisPrunerConfig, vispruner_select

SelectionConfig = DivPruneConfig | VisPrunerConfig | CDPrunerConfig
METHODS: dict[str, type] = {cls.name: cls for cls in (DivPruneConfig, VisPrunerConfig, CDPrunerConfig)}


def needs_text(cfg: SelectionConfig) -> bool:
    """Whether ``cfg``'s selection depends on the instruction (CDPruner's relevance), so a caller must give it."""
    return isinstance(cfg, CDPrunerConfig)


def selection_from_dict(data: dict[str, Any]) -> SelectionConfig:
    """The inverse of ``to_dict`` (``config.json`` holds ``{"method": name, ...options}``); ValueError naming the
    methods known."""
    options = dict(data)
    name = options.pop("method", None)
    if name not in METHODS:
        raise ValueError(f"a saved token selection needs 'method' in {sorted(METHODS)}, got {name!r}")
    return METHODS[name](**options)


def select_views(
    cfg: SelectionConfig,
    encoder: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
    projected: torch.Tensor | None = None,
    relevance: torch.Tensor | None = None,
) -> torch.Tensor:
    """The patches each view keeps under ``cfg``: (V, T) int64 positions among the view's N patches, ascending.

    Each method reads only its own inputs; a missing one is a ValueError naming it.

    Args:
        cfg: the method and its ``tokens`` T per view.
        encoder: (V, N, C_vision) patch features of the layer LLaVA reads (no [CLS]); VisPruner.
        cls_attention: (V, N) the [CLS] row's attention to those patches (head sum or mean); VisPruner.
        projected: (V, N, C_llm) the projector's output for the patches; DivPrune and CDPruner.
        relevance: (V, N) each patch's relevance to its row's instruction (``cdpruner_relevance``); CDPruner.
    """
    given = {"encoder": encoder, "cls_attention": cls_attention, "projected": projected, "relevance": relevance}
    needed = {
        "divprune": ("projected",),
        "vispruner": ("encoder", "cls_attention"),
        "cdpruner": ("projected", "relevance"),
    }[cfg.name]
    missing = [name for name in needed if given[name] is None]
    if missing:
        raise ValueError(f"{cfg.name} selects from {', '.join(needed)}; not given: {', '.join(missing)}")
    patches = given[needed[0]].shape[1]
    check_keep(cfg.name, cfg.tokens, patches)
    if isinstance(cfg, DivPruneConfig):
        return divprune_select(projected, cfg.tokens)
    if isinstance(cfg, VisPrunerConfig):
        return vispruner_select(encoder, cls_attention, cfg.tokens, cfg.important)
    return cdpruner_select(projected, relevance, cfg.tokens)


def gather_kept(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept tokens in the order of ``keep``: (V, N, C), (V, T) -> (V, T, C)."""
    return tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
