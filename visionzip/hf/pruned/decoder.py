"""An owned decoder loop for methods that prune image tokens inside the language model (FastV, PDrop, SparseVLM).

:class:`PrunedDecoderMixin` goes before a transformers decoder (``LlamaModel``, ``MistralModel``, ``Qwen2Model``...)
in a subclass's bases: our LLaVA's inner model, and the language model of the subclasses of transformers' LLaVA classes
(:mod:`visionzip.hf.inllm`). Without a method (:meth:`~PrunedDecoderMixin.pruning_config`, ``config.token_pruning``)
or with no image in the call, its ``forward`` is the parent's. With one,
the layers run one by one; after a layer the method names, the image tokens are scored from the layer's own query
and key projections (one query row per sample: no L x L map, so SDPA and FlashAttention stay on in every layer), the
rows are cut to their kept tokens (left-padded again) and the following layers run on the shorter sequence. Each
layer caches its own length; what decoding needs to continue (each layer group's kept-token mask and position
offset) is kept per cache object, so a later call with that cache (a decode step, or a follow-up turn that reuses
it) continues where the prefill left off.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from visionzip.baselines import PruneConfig, layer_average
from visionzip.baselines.prune import config_from_dict
from visionzip.hf.pruned.cuts import Tokens, mark_raters, renumbered, sparsevlm_cut, topk_cut


@dataclass
class Group:
    """Layers ``start`` .. the next group's start, which see the same tokens.

    Attributes:
        start: first layer index of the group.
        mask: (B, N_g) bool, the real tokens among those the group's layers cached at prefill.
        offset: (B,) int64 subtracted from the caller's position ids after the prefill (0 with original positions).
    """

    start: int
    mask: torch.Tensor
    offset: torch.Tensor


@dataclass
class PrefillState:
    """What a cache needs to continue after a pruned prefill: its groups and the prefill's length."""

    groups: list[Group]
    length: int


def attention_mask_for(mask: torch.Tensor, queries: int, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The mask a layer takes for ``queries`` new tokens over ``mask``'s keys (the last ``queries`` are the new ones).

    Args:
        mask: (B, N) bool, real keys.
        implementation: ``config._attn_implementation``: flash-attention takes the (B, N) padding mask, SDPA and
            eager an additive (B, 1, Q, N) float mask (causal and padding).
    """
    if "flash" in implementation:
        return mask.long()
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"in-LLM pruning supports sdpa, eager and flash attention, not {implementation!r}")
    keys = mask.shape[1]
    causal = torch.arange(keys, device=mask.device) <= torch.arange(keys - queries, keys, device=mask.device)[:, None]
    allowed = causal.unsqueeze(0) & mask[:, None, :]  # (B, Q, N)
    return (
        torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
        .masked_fill(~allowed, torch.finfo(dtype).min)
        .unsqueeze(1)
    )


class PrunedDecoderMixin:
    """The owned decoder loop (see the module docstring). Reads ``config.token_pruning``."""

    def pruning_config(self) -> PruneConfig | None:
        saved = getattr(self.config, "token_pruning", None)
        return config_from_dict(saved) if saved else None

    def pruning_report(self) -> list[tuple[float, float] | None]:
        """Per row of the last pruned prefill: the layer-average of its image tokens, (over the tokens each layer
        takes in, over those it puts out) (:func:`visionzip.baselines.layer_average`); None for a row without one."""
        counts = self.__dict__.get("visual_counts")
        if counts is None:
            raise ValueError("no pruned prefill has run on this model yet")
        return [layer_average(row.tolist()) if int(row[0]) else None for row in counts]

    def _states(self) -> weakref.WeakKeyDictionary:
        if "_pruned_states" not in self.__dict__:
            self.__dict__["_pruned_states"] = weakref.WeakKeyDictionary()
        return self.__dict__["_pruned_states"]

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, past_key_values: Cache | None = None,
        inputs_embeds=None, use_cache=None, image_ids: torch.Tensor | None = None, **kwargs,
    ):  # fmt: skip
        """The parent's forward, unless a method is set and this call holds image tokens (``image_ids`` (B, N):
        the image of each token, -1 for text) or continues a cache that a pruned prefill filled."""
        cfg = self.pruning_config()
        state = self._states().get(past_key_values) if past_key_values is not None else None
        has_image = image_ids is not None and bool((image_ids >= 0).any())
        if cfg is None or (not has_image and state is None):
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
            )  # fmt: skip
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if has_image:
            if state is not None or (past_key_values is not None and past_key_values.get_seq_length() > 0):
                raise ValueError(
                    f"{cfg.name} prunes image tokens at the prefill; a call that continues a cache cannot bring "
                    "new images (start a new cache, or re-prefill the whole conversation)"
                )
            if use_cache and past_key_values is None:
                past_key_values = DynamicCache(config=self.config)
            return self._prefill(cfg, inputs_embeds, attention_mask, position_ids, past_key_values, image_ids, kwargs)
        return self._continue(state, inputs_embeds, attention_mask, position_ids, past_key_values, kwargs)

    def _schedule(self, cfg: PruneConfig, image_ids: torch.Tensor, num_layers: int) -> dict[int, list[dict]]:
        """{layer after which to cut: per row {image id: tokens it keeps}}, from each image's own token count
        (SparseVLM's counts come from its scores at the cut: its layers map to empty dicts)."""
        if cfg.scored_by == "raters":
            cfg.check_layers(num_layers)
            return {layer: [{} for _ in image_ids] for layer in cfg.layers}
        schedule: dict[int, list[dict]] = {}
        for row, ids in enumerate(image_ids):
            for image, count in zip(*ids[ids >= 0].unique(return_counts=True), strict=True):
                for layer, keep in cfg.kept_after(int(count), num_layers).items():
                    schedule.setdefault(layer, [{} for _ in image_ids])[row][int(image)] = keep
        return schedule

    def _cut(self, cfg: PruneConfig, layer: int, hidden_in: torch.Tensor, tokens: Tokens, rope, keep: list[dict]):
        """The rows after ``cfg``'s cut following ``layer`` (``tokens`` hold its output), or None if nothing changes.
        FastV scores with this layer on its input, PDrop with the next layer on this one's output."""
        if cfg.scored_by == "raters":
            return sparsevlm_cut(cfg, self.layers[layer], hidden_in, tokens, rope)
        if cfg.scored_by == "next":
            return topk_cut(self.layers[layer + 1], tokens.hidden, tokens, rope, keep)
        return topk_cut(self.layers[layer], hidden_in, tokens, rope, keep)

    def _prefill(self, cfg, embeds, attention_mask, position_ids, cache, image_ids, kwargs) -> BaseModelOutputWithPast:
        """Run every layer, cutting the rows after the layers ``cfg`` names; hidden states come back at the input's
        length (zeros where a token was pruned), so labels and log-likelihoods line up with the input."""
        _refuse_recording(kwargs)
        batch, length = embeds.shape[:2]
        device = embeds.device
        mask = attention_mask.bool() if attention_mask is not None else embeds.new_ones(batch, length, dtype=torch.bool)
        if position_ids is None:
            position_ids = positions_from_mask(mask)
        position_ids = position_ids.expand(batch, -1)
        layers = self.layers[: self.config.num_hidden_layers]
        schedule = self._schedule(cfg, image_ids, len(layers))
        index = torch.arange(length, device=device).expand(batch, -1)
        tokens = Tokens(embeds, position_ids, mask, image_ids, index, torch.zeros_like(mask))
        if cfg.scored_by == "raters":
            tokens = mark_raters(tokens)
        counts = []  # per layer: (B,) visual tokens it takes in
        caller_last = position_ids.masked_fill(~mask, 0).max(dim=1).values  # (B,)
        layer_mask = create_causal_mask(
            config=self.config, inputs_embeds=embeds, attention_mask=attention_mask, past_key_values=cache,
            position_ids=position_ids,
        )  # fmt: skip
        rope = self.rotary_emb(embeds, position_ids)
        groups = [Group(0, mask, torch.zeros(batch, dtype=torch.long, device=device))]
        for i, layer in enumerate(layers):
            hidden_in = tokens.hidden
            counts.append(((tokens.image_ids >= 0) & tokens.mask).sum(dim=1))
            tokens.hidden = layer(
                hidden_in, attention_mask=layer_mask, position_embeddings=rope, position_ids=tokens.positions,
                past_key_values=cache, **kwargs,
            )  # fmt: skip
            cut = self._cut(cfg, i, hidden_in, tokens, rope, schedule[i]) if i in schedule else None
            if cut is None:
                continue
            tokens = cut
            if cfg.positions == "renumber":
                tokens.positions = renumbered(tokens)
            last = tokens.positions.masked_fill(~tokens.mask, 0).max(dim=1).values
            offset = caller_last - last if cfg.positions == "renumber" else torch.zeros_like(last)
            groups.append(Group(i + 1, tokens.mask, offset))
            rope = self.rotary_emb(tokens.hidden, tokens.positions)
            layer_mask = attention_mask_for(
                tokens.mask, tokens.mask.shape[1], self.config._attn_implementation, tokens.hidden.dtype
            )
        self.__dict__["visual_counts"] = torch.stack(counts, dim=1)  # (B, L): read by pruning reports
        self.__dict__["kept_columns"] = tokens.index  # (B, N'): input columns the last layers saw (-1: none)
        if cache is not None:
            self._states()[cache] = PrefillState(groups, length)
        hidden = self.norm(tokens.hidden)
        full = hidden.new_zeros(batch, length, hidden.shape[-1])
        rows, cols = (tokens.index >= 0).nonzero(as_tuple=True)
        full[rows, tokens.index[rows, cols]] = hidden[rows, cols]
        return BaseModelOutputWithPast(last_hidden_state=full, past_key_values=cache)

    def _continue(self, state: PrefillState, embeds, attention_mask, position_ids, cache, kwargs):
        """Tokens after a pruned prefill (decode steps, or a follow-up turn on the same cache): each layer group
        attends to what it cached, with its own mask and position offset."""
        _refuse_recording(kwargs)
        batch, queries = embeds.shape[:2]
        if cache.get_seq_length() < state.length:
            raise ValueError(
                f"the cache was cut to {cache.get_seq_length()} tokens, inside the pruned prefill of {state.length}: "
                "its kept tokens no longer match; prefill again (with the image)"
            )
        if attention_mask is None:  # every token is real: the first layer's cache tells how many came before
            total = cache.get_seq_length() + queries
            full = torch.ones(batch, total, dtype=torch.long, device=embeds.device)
        else:
            full = attention_mask
        if position_ids is None:
            position_ids = positions_from_mask(full)[:, -queries:]
        since = full[:, state.length :].bool()  # (B, T): every token after the prefill, these included
        layers = self.layers[: self.config.num_hidden_layers]
        bounds = [group.start for group in state.groups] + [len(layers)]
        hidden = embeds
        for g, group in enumerate(state.groups):
            positions = position_ids - group.offset[:, None]
            rope = self.rotary_emb(hidden, positions)
            if g == 0:  # the unpruned layers: the parent's own mask
                mask = create_causal_mask(
                    config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=cache,
                    position_ids=position_ids,
                )  # fmt: skip
            else:
                keys = torch.cat([group.mask, since], dim=1)
                mask = attention_mask_for(keys, queries, self.config._attn_implementation, hidden.dtype)
            for layer in layers[bounds[g] : bounds[g + 1]]:
                hidden = layer(
                    hidden, attention_mask=mask, position_embeddings=rope, position_ids=positions,
                    past_key_values=cache, **kwargs,
                )  # fmt: skip
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), past_key_values=cache)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) 0/1 or bool -> (B, N) each real token's position, counting only the real tokens before it (padding: 0)."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def _refuse_recording(kwargs: dict) -> None:
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(flag, False):
            raise ValueError(f"{flag} is not available while a method prunes tokens inside the language model")


def check_pruning(cfg: PruneConfig | dict, config, image_tokens: int) -> PruneConfig:
    """``cfg`` as a config, or ValueError with the numbers where this language model cannot run it on an image of
    ``image_tokens`` tokens (an image whose own count cannot meet it is refused when it comes, with its count).

    Args:
        config: the language model's config (``num_hidden_layers``, ``sliding_window``).
    """
    cfg = config_from_dict(cfg) if isinstance(cfg, dict) else cfg
    if getattr(config, "sliding_window", None):
        raise ValueError(
            f"{cfg.name} prunes inside the language model with full causal masks; this model attends through a "
            f"sliding window of {config.sliding_window} tokens, which the pruned layers would not respect"
        )
    if cfg.scored_by == "raters":
        cfg.check_layers(config.num_hidden_layers)
    else:
        cfg.kept_after(image_tokens, config.num_hidden_layers)
    return cfg


class PrunedCausalLMMixin:
    """For the causal LM: ``generate(..., image_ids=...)`` hands ``image_ids`` to the prefill only (the decode steps
    continue the pruned cache)."""

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None, **kwargs,
    ):  # fmt: skip
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs
        )
        if image_ids is not None and (past_key_values is None or past_key_values.get_seq_length() == 0):
            inputs["image_ids"] = image_ids
        return inputs
