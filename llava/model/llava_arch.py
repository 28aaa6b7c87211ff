"""What LLaVA adds to a causal LM: a vision tower, a projector, the VisionZip stage or a token selection (DivPrune,
VisPruner, CDPruner: :mod:`llava.model.selection`), and the multimodal input."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import parse_grid_pinpoints
from llava.model.anyres import image_grid, spatial_layout, visionzip_layout
from llava.model.config import BUDGET_MODES
from llava.model.input_builder import ImageTokens, MultimodalBatch, build_multimodal_batch
from llava.model.language_model.pruned import check_pruning
from llava.model.positions import flat_table, single_view_table, spatial_table
from llava.model.projector import build_vision_projector
from llava.model.selection import image_instructions, refuse_beside_selection, select_images, set_selection
from llava.model.vision_tower import CLIPVisionTower, build_vision_tower
from visionzip import VisionZipConfig, token_positions
from visionzip.baselines import PruneConfig
from visionzip.baselines.select import SelectionConfig

ImagesInput = torch.Tensor | list[torch.Tensor]
Instructions = list[str] | None  # one text per row of input_ids (per image for image_tokens); CDPruner reads it


class LlavaMetaModel:
    """Mixin for the inner model (``LlamaModel`` & co.): ``vision_tower``, ``mm_projector``, ``image_newline``."""

    def init_multimodal(self, config: Any) -> None:
        if not getattr(config, "mm_vision_tower", None):
            return
        self.vision_tower = build_vision_tower(config, getattr(config, "_attn_implementation", None))
        mm_hidden = config.mm_hidden_size or self.vision_tower.hidden_size
        self.mm_projector = build_vision_projector(config.mm_projector_type, mm_hidden, config.hidden_size)
        if "unpad" in (config.mm_patch_merge_type or ""):
            self.image_newline = nn.Parameter(torch.zeros(config.hidden_size))


def _as_views(images: ImagesInput) -> list[torch.Tensor]:
    """Any accepted image input -> one (V, 3, H, W) tensor per image (V = 1, or 1 + crops for AnyRes)."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 4:
            return list(images.unsqueeze(1))
        if images.dim() == 5:
            return list(images)
        raise ValueError(f"images must be (B, 3, H, W) or (B, V, 3, H, W), got shape {tuple(images.shape)}")
    views = []
    for image in images:
        if image.dim() not in (3, 4):
            raise ValueError(f"each image must be (3, H, W) or (V, 3, H, W), got shape {tuple(image.shape)}")
        views.append(image.unsqueeze(0) if image.dim() == 3 else image)
    return views


class LlavaMetaForCausalLM:
    """Mixin for the causal LM: image features, the VisionZip switch, and the multimodal input step."""

    def get_model(self) -> nn.Module:
        """The inner model holding ``vision_tower`` and ``mm_projector``."""
        return self.model

    def get_vision_tower(self) -> CLIPVisionTower:
        tower = getattr(self.model, "vision_tower", None)
        if tower is None:
            raise ValueError("this model has no vision tower (config.mm_vision_tower is not set)")
        return tower

    # --- VisionZip -------------------------------------------------------------------------------------------
    def set_visionzip(self, cfg: VisionZipConfig | dict | None, budget: str = "per_crop") -> None:
        """Turn VisionZip on (``cfg``) or off (None); written into ``config`` so ``save_pretrained`` keeps it.

        ``budget="per_crop"``: ``cfg`` applies to each view and must fit one view's encoder tokens (LLaVA-NeXT:
        the paper's 640/320/160 are 108+20 / 54+10 / 27+5 per view over 5 views).

        ``budget="total"``: ``cfg.tokens`` = T is the budget of a whole image of V views (the base view and its
        crops; V is known only when the image comes). Each view keeps ``T // V`` tokens (the remainder
        ``T % V`` is not used), split into dominant + contextual as :meth:`VisionZipConfig.from_budget` splits
        it (the paper's proportion: 640 over 5 views is 128 = 108+20 per view, over 3 views 213 = 180+33);
        ``cfg``'s own dominant:contextual split is not used, its other options (layer, selection, ...) are. An
        image whose views cannot share T (T < V, or ``T // V`` above a view's tokens) raises ValueError, with
        its view count, when it is encoded.
        """
        if budget not in BUDGET_MODES:
            raise ValueError(f"visionzip budget must be one of {BUDGET_MODES}, got {budget!r}")
        if cfg is None:
            self.config.visionzip, self.config.visionzip_budget = None, "per_crop"
            return
        cfg = VisionZipConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
        refuse_beside_selection(self, f"VisionZip {cfg.dominant}+{cfg.contextual}")
        tower = self.get_vision_tower()
        layers = tower.config.num_hidden_layers
        if cfg.resolve_layer(layers) != VisionZipConfig(layer=tower.select_layer).resolve_layer(layers):
            raise ValueError(
                f"VisionZip layer={cfg.layer} differs from mm_vision_select_layer={tower.select_layer}: the projector "
                "was trained on that layer's features; set both to the same layer"
            )
        if budget == "per_crop":  # a total is checked per image, against its own view count (_view_config)
            if cfg.tokens > tower.num_tokens:
                raise ValueError(
                    f"VisionZip per-crop budget {cfg.dominant}+{cfg.contextual} is larger than a crop's "
                    f"{tower.num_tokens} tokens; for a total over all crops use budget='total'"
                )
            cfg.check_fits(tower.num_tokens)
        self.config.visionzip, self.config.visionzip_budget = cfg.to_dict(), budget

    # --- pruning inside the language model (FastV, PDrop, SparseVLM) --------------------------------------------
    def set_pruning(self, cfg: PruneConfig | dict | None) -> None:
        """Prune image tokens inside the language model with ``cfg`` (``visionzip.baselines``), or not (None);
        written into ``config`` so ``save_pretrained`` keeps it. Refused, with the numbers, where the model cannot
        meet it on its largest image's tokens (LLaVA-1.5: one view; AnyRes: the base view and the most crops a
        pinpoint gives; VisionZip's budget per view when that is on too). Each image is checked again when it comes."""
        if cfg is None:
            self.config.token_pruning = None
            return
        refuse_beside_selection(self, f"the in-LLM method {cfg['method'] if isinstance(cfg, dict) else cfg.name}")
        vz, tower = self.config.visionzip_config(), self.get_vision_tower()
        tokens = vz.tokens if vz is not None else tower.num_patches_per_side**2
        if "anyres" in str(getattr(self.config, "image_aspect_ratio", "")) and self.config.image_grid_pinpoints:
            side = tower.config.image_size
            pinpoints = parse_grid_pinpoints(self.config.image_grid_pinpoints, side)
            crops = max((w // side) * (h // side) for w, h in pinpoints)
            tokens *= 1 + crops
        self.config.token_pruning = check_pruning(cfg, self.config, tokens).to_dict()

    # --- DivPrune, VisPruner, CDPruner between the encoder and the LLM -----------------------------------------
    def set_selection(self, cfg: SelectionConfig | dict | None) -> None:
        """Keep ``cfg.tokens`` patches per view chosen by ``cfg`` (``visionzip.baselines.select``), or all (None);
        written into ``config.token_selection`` so ``save_pretrained`` keeps it. Refused while VisionZip or an in-LLM
        method is on (one method at a time), and where T exceeds a view's patches (:func:`selection.set_selection`)."""
        set_selection(self, cfg)

    def _view_config(self, cfg: VisionZipConfig, views: int) -> VisionZipConfig:
        """The config each of an image's ``views`` views is compressed with (the split: :meth:`set_visionzip`)."""
        if getattr(self.config, "visionzip_budget", "per_crop") == "per_crop":
            return cfg
        per_view, available = cfg.tokens // views, self.get_vision_tower().num_tokens
        if per_view < 1:
            raise ValueError(
                f"VisionZip total budget {cfg.tokens} is smaller than this image's {views} views (base + "
                f"{views - 1} crops): expected a total of at least {views}"
            )
        if per_view > available:
            raise ValueError(
                f"VisionZip total budget {cfg.tokens} over this image's {views} views is {per_view} per view, more "
                f"than a view's {available} tokens: expected a total below {(available + 1) * views}"
            )
        split = VisionZipConfig.from_budget(per_view)
        view_cfg = dataclasses.replace(cfg, dominant=split.dominant, contextual=split.contextual)
        view_cfg.check_fits(available)
        return view_cfg

    # --- image features --------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N', C_llm): tower features, then the projector."""
        return self.model.mm_projector(self.get_vision_tower()(images))

    def _visionzip_views(self, views: list[torch.Tensor], cfg: VisionZipConfig) -> list[tuple]:
        """Per image: (projected tokens (V, K, C_llm), keep (V, D), the per-view config).

        The encoder and the projector each run once for the whole batch, whatever budget each image gets: under
        ZeRO-3 every rank must call the same modules, and as often, in every step.
        """
        sizes = [v.shape[0] for v in views]
        cfgs = [self._view_config(cfg, size) for size in sizes]
        compressed = self.get_vision_tower().forward_visionzip_images(torch.cat(views), sizes, cfgs)
        counts = [t.shape[0] * t.shape[1] for t, _ in compressed]
        flat = torch.cat([t.flatten(0, 1) for t, _ in compressed])  # (sum of V_i * K_i, C): the projector is per token
        projected = self.model.mm_projector(flat.unsqueeze(0)).squeeze(0).split(counts)
        return [
            (p.view(t.shape[0], t.shape[1], -1), k, c) for p, (t, k), c in zip(projected, compressed, cfgs, strict=True)
        ]

    def image_features(
        self, images: ImagesInput, image_sizes: list | None = None, instructions: Instructions = None
    ) -> list[torch.Tensor]:
        """One (n_i, C_llm) tensor per image; n_i is whatever the configured path gives."""
        return [image.tokens for image in self.image_tokens(images, image_sizes, instructions)]

    def image_tokens(
        self, images: ImagesInput, image_sizes: list | None = None, instructions: Instructions = None
    ) -> list[ImageTokens]:
        """One :class:`ImageTokens` per image: its tokens and, with VisionZip's ``positions="original"``, where
        they stand among the vanilla tokens of that image (:mod:`llava.model.positions`); packed otherwise.
        ``instructions``: one per image (here each image is its own row), read by CDPruner only."""
        views = _as_views(images)
        cfg, selection = self.config.visionzip_config(), self.config.selection_config()
        if selection is not None:
            parts = select_images(self, views, selection, instructions)
        elif cfg is None:
            feats = self.encode_images(torch.cat(views)).split([v.shape[0] for v in views])
            parts = [(f, None, None) for f in feats]
        else:
            parts = self._visionzip_views(views, cfg)
        sizes = image_sizes if image_sizes is not None else [None] * len(views)
        if len(sizes) != len(views):
            raise ValueError(f"got {len(sizes)} image_sizes for {len(views)} images")
        return [self._merge_views(f, k, c, s) for (f, k, c), s in zip(parts, sizes, strict=True)]

    def _merge_views(self, feats: torch.Tensor, keep, cfg, size) -> ImageTokens:
        """(V, K, C) tokens of one image -> its tokens (n, C) in the configured layout, with their positions."""
        newline = getattr(self.model, "image_newline", None)
        tokens = self._layout(feats, keep, cfg, size, newline)
        if not isinstance(cfg, VisionZipConfig) or cfg.positions == "packed":
            return ImageTokens(tokens)
        table, span = self._position_table(feats.shape[0], size, newline is not None)  # (V, N)
        full = table.to(keep.device).gather(1, token_positions(keep, table.shape[1], cfg.contextual))  # (V, K)
        last = torch.tensor([span - 1], device=keep.device)  # a trailing image_newline's slot
        positions = self._layout(full.unsqueeze(-1), keep, cfg, size, last)[:, 0]  # (n,)
        return ImageTokens(tokens, positions, span)

    def _layout(self, feats: torch.Tensor, keep, cfg, size, newline: torch.Tensor | None) -> torch.Tensor:
        """(V, K, C) values of one image's tokens -> (n, C) in the configured layout (tokens, or their positions)."""
        merge_type = self.config.mm_patch_merge_type or "flat"
        if feats.shape[0] == 1:
            single = feats[0]
            if "unpad" in merge_type and newline is not None:
                single = torch.cat([single, newline.view(1, -1).to(single)])
            return single
        if merge_type == "flat":
            return feats.flatten(0, 1)
        if not merge_type.startswith("spatial"):
            raise ValueError(f"unknown mm_patch_merge_type {merge_type!r}")
        if size is None:
            raise ValueError("multi-crop (AnyRes) images need image_sizes=[(width, height), ...]")
        tower = self.get_vision_tower()
        grid = image_grid(size, self.config.image_grid_pinpoints, tower.config.image_size)
        side = tower.num_patches_per_side
        if cfg is not None:  # VisionZip's per-crop layout; a selection's T kept patches take the dominant's place
            kept = cfg.dominant if isinstance(cfg, VisionZipConfig) else cfg.tokens
            return visionzip_layout(feats, keep, grid, side, kept, tower.num_tokens - side * side)
        return spatial_layout(feats, grid, side, size, newline, "unpad" in merge_type)

    def _position_table(self, views: int, size, has_newline: bool) -> tuple[torch.Tensor, int]:
        """(V, N) vanilla position of each view's encoder tokens within the image, and the image's vanilla span."""
        tower = self.get_vision_tower()
        merge_type = self.config.mm_patch_merge_type or "flat"
        side = tower.num_patches_per_side
        prefix = tower.num_tokens - side * side
        dropped = prefix if tower.select_feature == "patch" else 0
        unpad = "unpad" in merge_type
        if views == 1:
            return single_view_table(tower.num_tokens, dropped, unpad and has_newline)
        if merge_type == "flat":
            return flat_table(views, tower.num_tokens, dropped)
        grid = image_grid(size, self.config.image_grid_pinpoints, tower.config.image_size)
        return spatial_table(grid, side, prefix, size if unpad else None, unpad and has_newline)

    # --- LLM input -------------------------------------------------------------------------------------------
    def prepare_inputs_labels_for_multimodal(
        self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None,
        padding_side: str | None = None, truncate: bool = True,
    ):  # fmt: skip
        """LLaVA's signature: returns (None, position_ids, attention_mask, past_key_values, inputs_embeds, labels).

        The spliced samples are padded on ``padding_side`` (None: ``config.tokenizer_padding_side``, the side
        training used); ``position_ids`` count only each sample's real tokens, from 0. ``truncate``: cut each
        sample to ``config.tokenizer_model_max_length``, training's limit (generation never cuts a prompt: its
        end holds the question).
        """
        batch = self.multimodal_batch(input_ids, attention_mask, labels, images, image_sizes, padding_side, truncate)
        return None, batch.position_ids, batch.attention_mask, past_key_values, batch.inputs_embeds, batch.labels

    def multimodal_batch(
        self, input_ids, attention_mask, labels, images, image_sizes=None, padding_side: str | None = None,
        truncate: bool = True, instructions: Instructions = None,
    ) -> MultimodalBatch:  # fmt: skip
        """:meth:`prepare_inputs_labels_for_multimodal`'s work, as a :class:`MultimodalBatch` (with ``image_ids``).
        ``instructions``: one per row of ``input_ids``; every image of a row is selected with its row's (CDPruner)."""
        per_image = image_instructions(input_ids, attention_mask, instructions)
        features = self.image_tokens(images, image_sizes, per_image) if images is not None else []
        side = padding_side if padding_side is not None else getattr(self.config, "tokenizer_padding_side", "right")
        return build_multimodal_batch(
            input_ids, attention_mask, labels, features, self.get_input_embeddings(), padding_side=side,
            max_length=getattr(self.config, "tokenizer_model_max_length", None) if truncate else None,
        )  # fmt: skip

    def pruning_inputs(self, image_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``{"image_ids": image_ids}`` for the language model when a method prunes inside it and the call holds an
        image token; nothing otherwise (the parent's forward then runs exactly as without a method)."""
        if image_ids is None or not getattr(self.config, "token_pruning", None) or not bool((image_ids >= 0).any()):
            return {}
        return {"image_ids": image_ids}


class LlavaCausalLMMixin(LlavaMetaForCausalLM):
    """``forward`` and ``generate`` with ``images=``; placed before the transformers causal LM in the MRO."""

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
        labels=None, images: ImagesInput | None = None, image_sizes: list | None = None,
        instructions: Instructions = None, **kwargs,
    ):  # fmt: skip
        """The causal LM's forward; with ``images``, placeholders in ``input_ids`` become visual tokens first
        (``instructions``: one per row, for CDPruner)."""
        if inputs_embeds is None and input_ids is not None and (images is not None or has_placeholder(input_ids)):
            batch = self.multimodal_batch(
                input_ids, attention_mask, labels, images, image_sizes, instructions=instructions
            )
            position_ids, attention_mask, labels = batch.position_ids, batch.attention_mask, batch.labels
            inputs_embeds = batch.inputs_embeds
            kwargs.update(self.pruning_inputs(batch.image_ids))
            input_ids = None
        if attention_mask is None and position_ids is not None and past_key_values is None:
            # transformers reads non-consecutive position ids without a mask as packed sequences and would block
            # attention between them; ours are one sequence each (VisionZip's original positions skip ahead)
            source = input_ids if input_ids is not None else inputs_embeds
            attention_mask = torch.ones(source.shape[:2], dtype=torch.long, device=source.device)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, **kwargs,
        )  # fmt: skip

    @torch.no_grad()
    def generate(
        self, inputs: torch.Tensor | None = None, images: ImagesInput | None = None,
        image_sizes: list | None = None, instructions: Instructions = None, **kwargs,
    ):  # fmt: skip
        """LLaVA's ``generate(input_ids, images=..., image_sizes=...)``; returns only the new tokens.
        ``instructions``: one text per row (the row's question), read by CDPruner's selection only.

        ``inputs`` (B, L) may be padded on either side (``attention_mask`` marks the real tokens). The spliced
        prompts are always left-padded here, whatever ``config.tokenizer_padding_side`` says: every row's
        last column is then its last real token, so the first new token of each row, and each later one,
        is predicted from that row's own text, as when the prompt is generated alone. The rows' position ids are
        passed explicitly and transformers continues each row from its own last one (+1 per new token): with
        VisionZip's ``positions="original"`` decoding goes on at the vanilla length of that row's prompt (a
        per-row offset, as Qwen2-VL's ``rope_deltas``, needs no extra state).
        """
        if "inputs_embeds" in kwargs:
            raise ValueError("pass input_ids (with image placeholders) and images, not inputs_embeds")
        if kwargs.pop("position_ids", None) is not None:
            raise ValueError("generate numbers the positions of the spliced prompts itself; pass no position_ids")
        attention_mask = kwargs.pop("attention_mask", None)
        if inputs is None:
            raise ValueError("generate needs input_ids")
        batch = self.multimodal_batch(
            inputs, attention_mask, None, images, image_sizes, "left", truncate=False, instructions=instructions
        )
        return super().generate(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            **self.pruning_inputs(batch.image_ids), **kwargs,
        )  # fmt: skip


def has_placeholder(input_ids: torch.Tensor) -> bool:
    """Whether any image placeholder is present (``IMAGE_TOKEN_INDEX`` cannot be embedded)."""
    return bool((input_ids == IMAGE_TOKEN_INDEX).any())
