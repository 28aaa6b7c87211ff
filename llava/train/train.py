"""Train LLaVA: stage 1 (projector), full or LoRA fine-tuning, and VisionZip‡ (projector on compressed tokens).

python -m llava.train.train --config configs/train/visionzip_ft_llava15.yaml --output_dir OUT [--flag value ...]
deepspeed llava/train/train.py --deepspeed configs/deepspeed/zero2.json ...
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file by the `deepspeed` launcher: make `llava` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import TrainerCallback, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llava.train.arguments import DataArguments, TrainingArguments, parse_args, save_resolved
from llava.train.data import (
    DataCollator,
    ImageSettings,
    LazySupervisedDataset,
    check_images,
    image_files,
    read_records,
    take_fraction,
)
from llava.train.model_setup import build_model, set_trainable, training_mode
from llava.train.trainer import LlavaTrainer

logger = logging.getLogger("llava.train")
RESOLVED_ARGS = "train_args.yaml"


def _setup_logging(args: TrainingArguments) -> None:
    level = logging.INFO if args.process_index == 0 else logging.WARNING  # one rank speaks
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` that holds ``trainer_state.json``, or None.

    The Trainer writes that file last, so a job killed while saving leaves a newer folder without it (weights half
    written, no DeepSpeed engine state): resuming from it would fail or start from a partial state.
    """
    steps = {}
    for path in Path(folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if step.isdigit() and path.is_dir():
            steps[int(step)] = path
    for step in sorted(steps, reverse=True):
        if (steps[step] / TRAINER_STATE_NAME).is_file():
            return str(steps[step])
        logger.warning("resume: skipping %s, an incomplete checkpoint (no %s)", steps[step], TRAINER_STATE_NAME)
    return None


def resolve_resume(args: TrainingArguments) -> str | None:
    """``--resume_from_checkpoint auto``: the newest complete checkpoint in the output folder, or a fresh start."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "none", "false"):
        return None
    if str(value).lower() in ("auto", "true"):
        found = last_complete_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        logger.info("resume: %s", found or f"no checkpoint in {args.output_dir}, starting fresh")
        return found
    if not Path(value).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value} is not a folder")
    return str(value)


def build_dataset(data_args: DataArguments, args: TrainingArguments, tokenizer, model, template: str, mode: str):
    """Read, subsample (seeded), check every image, and wrap the samples in the lazy dataset."""
    records = read_records(data_args.data_path)
    seed = args.data_seed if args.data_seed is not None else args.seed
    subset = take_fraction(records, data_args.data_fraction, seed)
    if len(subset) != len(records):
        logger.info("--data_fraction %s: %d of %d samples (seed %d)", data_args.data_fraction, len(subset),
                    len(records), seed)  # fmt: skip
    if mode == "projector":  # the projector gets no gradient from a text-only sample (and a text-only batch none)
        with_images = [rec for rec in subset if image_files(rec)]
        if len(with_images) != len(subset):
            logger.info("projector-only training: %d text-only samples left out", len(subset) - len(with_images))
        subset = with_images
    subset = check_images(subset, data_args.image_folder, data_args.skip_missing_images, args.process_index == 0)
    if not subset:
        raise ValueError("no training samples left")
    images = ImageSettings(
        model.get_vision_tower().image_processor(), model.config.image_aspect_ratio, model.config.image_grid_pinpoints
    )
    return LazySupervisedDataset(subset, tokenizer, template, data_args.image_folder, images, args.model_max_length)


def train(argv: Sequence[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> LlavaTrainer:
    """Run one training job; the final weights are in ``--output_dir`` in the mode's format. Returns the trainer."""
    model_args, data_args, args = parse_args(argv)
    _setup_logging(args)
    os.environ.setdefault("WANDB_MODE", "offline")  # wandb logs locally unless the user says otherwise
    args.remove_unused_columns = False  # images and image_sizes are not columns of a text dataset
    set_seed(args.seed)  # before the model is built: a new projector's initial weights come from this seed
    resume = resolve_resume(args)
    mode = training_mode(model_args, args)
    model, tokenizer = build_model(model_args, data_args, args)
    dataset = build_dataset(data_args, args, tokenizer, model, model_args.version, mode)
    model = set_trainable(model, mode, model_args, args)
    save_resolved(Path(args.output_dir) / RESOLVED_ARGS, model_args, data_args, args)
    trainer = LlavaTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=DataCollator(tokenizer.pad_token_id),
        processing_class=tokenizer, callbacks=callbacks, mode=mode,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    trainer.save_model(args.output_dir)
    logger.info("done: %s weights in %s", mode, args.output_dir)
    return trainer


def main() -> None:
    train()


if __name__ == "__main__":
    main()
