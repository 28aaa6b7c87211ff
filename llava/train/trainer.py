"""LLaVA's Trainer: a projector learning rate, modality-grouped batches, and checkpoints in LLaVA's formats."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import Sampler
from transformers import Trainer

from llava.model.builder import load_projector_state, read_state_dict

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


class LlavaTrainer(Trainer):
    """``mode`` is ``projector`` (stage 1, VisionZip‡), ``lora`` or ``full`` (see ``llava.train.model_setup``).

    Checkpoints: projector mode writes ``mm_projector.{bin,safetensors}`` + ``config.json`` (LLaVA's stage-1 files);
    LoRA writes the adapter + ``non_lora_trainables.bin`` + ``config.json``; full mode the whole model. Each reloads
    with ``load_pretrained_model`` and resumes with ``--resume_from_checkpoint``.
    """

    def __init__(self, *args, mode: str = "full", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mode = mode

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
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.config

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
