"""LLaVA's Trainer: a projector learning rate, modality-grouped batches, and checkpoints in LLaVA's formats."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Sampler
from transformers import Trainer

from llava.model.builder import load_projector_state, read_state_dict
from llava.train.data import blank_image

logger = logging.getLogger(__name__)

PROJECTOR_KEY = "mm_projector"
NON_LORA_NAME = "non_lora_trainables"


class ModalityLengthGroupedSampler(Sampler[int]):
    """Batches hold one modality (image or text-only) and samples of similar length, in a seeded random order.

    ``lengths`` are positive for samples with images and negative for text-only ones (LLaVA's convention). Each
    modality is shuffled, cut into mega-batches of ``group`` samples sorted by length, and the mega-batches of both
    are shuffled together; the two leftovers form the last one. ``set_epoch`` changes the order per epoch,
    reproducibly (so a resumed run matches).
    """

    def __init__(self, lengths: list[int], group: int, seed: int) -> None:
        if group < 1:
            raise ValueError(f"group size must be >= 1, got {group}")
        self.lengths, self.group, self.seed, self.epoch = lengths, group, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def _megabatches(self, indices: list[int], generator: torch.Generator) -> tuple[list[list[int]], list[int]]:
        """Full mega-batches of one modality, sorted longest first, and the leftover (fewer than ``group``)."""
        order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        full = len(order) - len(order) % self.group
        chunks = [order[i : i + self.group] for i in range(0, full, self.group)]
        return [sorted(chunk, key=lambda i: -abs(self.lengths[i])) for chunk in chunks], order[full:]

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        image, image_rest = self._megabatches([i for i, n in enumerate(self.lengths) if n > 0], generator)
        text, text_rest = self._megabatches([i for i, n in enumerate(self.lengths) if n <= 0], generator)
        batches = image + text
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[b]
        yield from image_rest + text_rest  # the only mega-batch that may mix modalities comes last


def _text_only_as_multimodal(
    model: nn.Module, args: tuple, kwargs: dict[str, Any], image: torch.Tensor, size: tuple[int, int]
) -> tuple[tuple, dict] | None:
    """Forward pre-hook: a batch without images becomes embeddings through the image path (see
    :func:`image_path_for_text_only`); other calls pass unchanged."""
    input_ids = kwargs.get("input_ids")
    if args or input_ids is None or kwargs.get("images") is not None or kwargs.get("inputs_embeds") is not None:
        return None
    features = model.image_features([image.to(input_ids.device)], [size])  # the tower, then the projector: first
    idle = sum(f.float().mean() for f in features) * 0.0  # fp32 mean: an fp16 sum could overflow, and 0 * inf = nan
    _, position_ids, attention_mask, past, embeds, labels = model.prepare_inputs_labels_for_multimodal(
        input_ids, kwargs.get("position_ids"), kwargs.get("attention_mask"), kwargs.get("past_key_values"),
        kwargs.get("labels"), None,
    )  # fmt: skip
    kwargs.update(input_ids=None, inputs_embeds=embeds + idle.to(embeds.dtype), position_ids=position_ids,
                  attention_mask=attention_mask, past_key_values=past, labels=labels)  # fmt: skip
    return args, kwargs


@contextmanager
def image_path_for_text_only(model: nn.Module, image: torch.Tensor, size: tuple[int, int]) -> Iterator[None]:
    """While open, a forward of ``model`` (a LLaVA causal LM) on a batch without images runs the image path anyway.

    The tower and projector encode ``image`` (pixels (3, H, W) or AnyRes views (V, 3, H, W) of an image of
    (width, height) ``size``, e.g. :func:`llava.train.data.blank_image`) and 0 x their output is added to the token
    embeddings, which are built per sample as for an image batch. So every batch runs the same modules in the same
    order, and the projector (and ``image_newline``) get a gradient, of zeros here, on every rank: under ZeRO-3 each
    rank gathers the parameters of each module it runs and DeepSpeed checks that all ranks run the same sequence, so
    a rank with a text-only batch would otherwise hang or fail (DDP likewise waits for the projector's gradient).
    The loss is unchanged. The hook is removed on exit.
    """
    hook = functools.partial(_text_only_as_multimodal, image=image, size=size)
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class LlavaTrainer(Trainer):
    """``mode`` is ``projector`` (stage 1, VisionZip‡), ``lora`` or ``full`` (see ``llava.train.model_setup``).

    Checkpoints: projector mode writes ``mm_projector.{bin,safetensors}`` + ``config.json`` (LLaVA's stage-1 files);
    LoRA writes the adapter + ``non_lora_trainables.bin`` + ``config.json``; full mode the whole model. Each reloads
    with ``load_pretrained_model`` and resumes with ``--resume_from_checkpoint``.
    """

    def __init__(self, *args, mode: str = "full", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mode = mode
        self._blank: tuple[torch.Tensor, tuple[int, int]] | None = None

    # --- optimisation ----------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """As the Trainer's, with the projector's parameters at ``--mm_projector_lr`` when it is set."""
        if self.optimizer is not None or self.args.mm_projector_lr is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups.setdefault((name in decay, PROJECTOR_KEY in name), []).append(param)
        param_groups = [
            {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0,
             **({"lr": self.args.mm_projector_lr} if is_projector else {})}
            for (decays, is_projector), params in groups.items()
        ]  # fmt: skip
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        group = self.args.train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ModalityLengthGroupedSampler(dataset.modality_lengths, group, seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """As the Trainer's, with text-only batches run through the image path (:func:`image_path_for_text_only`)."""
        llava = self._llava_model(model)
        if self._blank is None:  # a black image, preprocessed as the data's images are
            self._blank = blank_image(self.train_dataset.images, llava.get_vision_tower().config.image_size)
        with image_path_for_text_only(llava, *self._blank):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _llava_model(self, model: nn.Module) -> nn.Module:
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    # --- saving and resuming ---------------------------------------------------------------------------------------
    def _trainable_state(self, state_dict: dict | None, keep) -> dict[str, torch.Tensor]:
        state = state_dict if state_dict else self.accelerator.unwrap_model(self.model).state_dict()
        return {k: v.detach().cpu().contiguous() for k, v in state.items() if keep(k)}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        config = self._base_config()
        training_value, config.use_cache = config.use_cache, True  # saved for inference, where the KV cache is on
        try:
            self._save_mode(output_dir if output_dir is not None else self.args.output_dir, state_dict)
        finally:
            config.use_cache = training_value

    def _save_mode(self, output_dir: str, state_dict: dict | None) -> None:
        if self.mode == "full":
            return super()._save(output_dir, state_dict)
        if self.mode == "lora":
            super()._save(output_dir, state_dict)
            names = {n for n, p in self.model.named_parameters() if p.requires_grad and "lora_" not in n}
            extra = self._trainable_state(state_dict, lambda k: k in names)
            if self.args.should_save:
                torch.save(extra, Path(output_dir) / f"{NON_LORA_NAME}.bin")
                self._base_config().save_pretrained(output_dir)
            return None
        projector = self._trainable_state(state_dict, lambda k: f"{PROJECTOR_KEY}." in k)
        projector = {k.removeprefix("base_model.model."): v for k, v in projector.items()}
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(projector, Path(output_dir) / f"{PROJECTOR_KEY}.bin")
            save_file(projector, str(Path(output_dir) / f"{PROJECTOR_KEY}.safetensors"))
            self._base_config().save_pretrained(output_dir)
            torch.save(self.args, Path(output_dir) / "training_args.bin")
            logger.info("projector (%d tensors) saved to %s", len(projector), output_dir)
        return None

    def _base_config(self):
        return self._llava_model(self.model).config

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = Path(resume_from_checkpoint)
        target = self.model if model is None else model
        if self.mode == "projector":
            load_projector_state(target, read_state_dict(path, PROJECTOR_KEY), str(path))
            logger.info("resumed the projector from %s", path)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.mode == "lora":
            extra = read_state_dict(path, NON_LORA_NAME)
            result = target.load_state_dict(extra, strict=False)
            if result.unexpected_keys:
                raise ValueError(f"{path}: unknown keys in {NON_LORA_NAME}: {result.unexpected_keys[:10]}")
