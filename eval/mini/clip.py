"""A tiny CLIP trained from scratch on the mini splits' captions (python -m eval.mini.clip).

One tower serves both splits: image_size 96 with patch 12 gives the same 8 x 8 = 64 patches + [CLS] as easy-VQA's
64 x 64 images would with patch 8, but keeps the multi split's 96 x 96 images (and their small shapes) at full
resolution; easy-VQA images are upscaled 1.5x by the tower's own CLIPImageProcessor, so one patch still covers
8 x 8 of their pixels. Training is CLIP's symmetric image-text contrastive loss, with in-batch duplicates of a
caption (easy-VQA has only 24) counted as positives rather than negatives.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
from transformers.image_processing_utils import BaseImageProcessor

from eval.mini.data import KINDS, is_done, write_json
from eval.mini.shapes import COLORS, PALETTE, SHAPES, Shape, caption
from llava.model.vision_tower import quiet_load_report
from llava.tiny import clip_image_processor, derived_seed, seeded

logger = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
CAPTION_WORDS: tuple[str, ...] = ("a", "small", "and", ",", *SHAPES, *COLORS)
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ClipConfig:
    """Sizes and training settings of the tiny CLIP; saved in manifest.json and compared on resume."""

    kinds: tuple[str, ...] = ("easy", "small")  # the splits whose training images and captions it learns from
    image_size: int = 96
    patch_size: int = 12
    hidden_size: int = 64
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 256
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 128
    text_max_len: int = 32
    projection_dim: int = 64
    epochs: int = 10  # easy-VQA's shapes are learnt late: 5 epochs left them at ~0.5-0.55 (colours at 1.0)
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    seed: int = 0
    hard_negatives: bool = False  # add each caption with one attribute swapped as a negative: measured no gain
    max_steps: int | None = None  # stop early (tests)
    probe_topk: tuple[int, ...] = (5, 11, 18)  # dominant patches kept at ~1/9, ~2/9, ~1/3 of 64 tokens (54:10 split)

    def __post_init__(self) -> None:
        """Validate that the sizes fit together."""
        checks = {
            "image_size % patch_size == 0": self.image_size % self.patch_size == 0,
            "hidden_size % heads == 0": self.hidden_size % self.heads == 0,
            "text_hidden_size % text_heads == 0": self.text_hidden_size % self.text_heads == 0,
            "layers >= 2 (the probe reads layer -2)": self.layers >= 2,
            "epochs, batch_size, lr > 0": self.epochs > 0 and self.batch_size > 1 and self.lr > 0,
            "kinds non-empty": len(self.kinds) > 0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"ClipConfig: expected {', '.join(failed)}; got {self}")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


# ----------------------------------------------------------------------------------------------------------------------
# text side: a word-level tokenizer over the caption vocabulary


def build_caption_tokenizer(max_len: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer of the captions: <pad>=0, <unk>=1, the words, then BOS and EOS last as in OpenAI CLIP.

    EOS is never id 2, which CLIP's text tower would treat as a legacy config (pooling at the largest id).
    """
    vocab = {token: i for i, token in enumerate((PAD, UNK, *CAPTION_WORDS, BOS, EOS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "circle," into "circle" ","
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS, model_max_length=max_len
    )


def tokenize_captions(tokenizer: PreTrainedTokenizerFast, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (N, L), padded to the longest; raises ValueError on unknown words or overflow."""
    batch = tokenizer(list(captions), padding=True, return_tensors="pt")
    if (batch.input_ids == tokenizer.unk_token_id).any():
        bad = [c for c, ids in zip(captions, batch.input_ids, strict=True) if (ids == tokenizer.unk_token_id).any()]
        raise ValueError(f"captions with words outside {CAPTION_WORDS}: {bad[:5]}")
    if batch.input_ids.shape[1] > tokenizer.model_max_length:
        length, limit = batch.input_ids.shape[1], tokenizer.model_max_length
        raise ValueError(f"captions need {length} tokens, the text tower takes at most {limit}")
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


# ----------------------------------------------------------------------------------------------------------------------
# model, images


def clip_model_config(cfg: ClipConfig, tokenizer: PreTrainedTokenizerFast) -> CLIPConfig:
    """The CLIPConfig of `cfg`; the text tower's ids follow `tokenizer`."""
    text = {
        "hidden_size": cfg.text_hidden_size,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.text_heads,
        "intermediate_size": cfg.text_intermediate_size,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": cfg.text_max_len,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        # each tower's own projection_dim too: CLIPTextModelWithProjection (CDPruner's text relevance) reads the
        # text tower's, whose default (512) would not match the saved 64-wide projection
        "projection_dim": cfg.projection_dim,
    }
    vision = {
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.intermediate_size,
        "projection_dim": cfg.projection_dim,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)


def image_processor(image_size: int) -> BaseImageProcessor:
    """LLaVA's CLIPImageProcessor settings (shortest edge, centre crop, OpenAI mean/std) for `image_size`."""
    return clip_image_processor(image_size)


def read_rgb(path: Path) -> Image.Image:
    """An image file as an RGB image, the file closed."""
    with Image.open(path) as image:
        return image.convert("RGB")


def load_split(data_dir: Path, kind: str, split: str, processor: Any, limit: int | None = None) -> dict[str, Any]:
    """Pixels (N, 3, S, S) made by the tower's own processor, plus captions and object metadata of one split."""
    meta = json.loads((data_dir / kind / f"images_{split}.json").read_text())[:limit]
    chunks = []
    for start in tqdm(range(0, len(meta), 500), desc=f"load {kind} {split}", unit="chunk"):
        images = [read_rgb(data_dir / kind / m["image"]) for m in meta[start : start + 500]]
        chunks.append(processor(images=images, return_tensors="pt").pixel_values)
    return {"pixels": torch.cat(chunks), "meta": meta, "kind": kind, "root": data_dir / kind}


# ----------------------------------------------------------------------------------------------------------------------
# training


def contrastive_loss(logits: torch.Tensor, image_ids: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where every text with an image's caption is a positive of that image.

    logits: (B, T) image-to-text similarities, T >= B: text i < B is image i's caption, texts from B on are extra
    (hard) negatives, used in the image-to-text direction only. image_ids (B,), text_ids (T,): an id per caption
    string, so that duplicate captions (easy-VQA has 24) count as positives rather than as negatives.
    """
    batch = logits.shape[0]
    same = (image_ids[:, None] == text_ids[None, :]).float()  # (B, T); same[i, i] = 1
    image_to_text = F.cross_entropy(logits, same / same.sum(dim=1, keepdim=True))
    back = same[:, :batch].t()  # (B, B)
    text_to_image = F.cross_entropy(logits[:, :batch].t(), back / back.sum(dim=1, keepdim=True))
    return (image_to_text + text_to_image) / 2


def _schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _batches(count: int, cfg: ClipConfig) -> Iterator[torch.Tensor]:
    """Indices of the training batches: seeded shuffles, full batches only, `cfg.epochs` epochs or `max_steps`."""
    generator = torch.Generator().manual_seed(derived_seed(cfg.seed, "clip-batches"))
    steps_per_epoch = count // cfg.batch_size
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    step = 0
    while step < total:
        order = torch.randperm(count, generator=generator)
        for start in range(0, min(steps_per_epoch, total - step) * cfg.batch_size, cfg.batch_size):
            yield order[start : start + cfg.batch_size]
            step += 1


def _features(out: Any) -> torch.Tensor:
    """The projected embeddings: transformers 5 returns an output whose pooler_output holds them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _batch_loss(model: CLIPModel, pixels: torch.Tensor, text: dict[str, torch.Tensor],
                text_ids: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The contrastive loss of B images (B, 3, S, S) against T >= B tokenised texts (the first B their captions)."""
    images = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)  # (B, P)
    texts = F.normalize(_features(model.get_text_features(**text)), dim=-1)  # (T, P)
    logits = model.logit_scale.exp() * images @ texts.t()  # (B, T)
    return contrastive_loss(logits, text_ids[: len(pixels)], text_ids)


def swapped_caption(meta: dict[str, Any], rng: np.random.Generator) -> str:
    """The caption of an image's `objects` with one object's colour (to an absent one) or shape changed."""
    objects = [Shape(o["shape"], o["color"], tuple(o["box"]), o["small"]) for o in meta["objects"]]
    k = int(rng.integers(len(objects)))
    obj = objects[k]
    if rng.random() < 0.5:
        free = [c for c in COLORS if c not in {o.color for o in objects}]
        objects[k] = Shape(obj.shape, str(rng.choice(free)), obj.box, obj.small)
    else:
        objects[k] = Shape(str(rng.choice([s for s in SHAPES if s != obj.shape])), obj.color, obj.box, obj.small)
    return caption(objects)


def train_clip(model: CLIPModel, pixels: torch.Tensor, meta: Sequence[dict[str, Any]],
               tokenizer: PreTrainedTokenizerFast, cfg: ClipConfig) -> list[float]:  # fmt: skip
    """Train in place with AdamW on (N, 3, S, S) pixels and their captions; returns the loss of every step.

    With `cfg.hard_negatives`, each image's caption with one object's colour or shape changed joins the batch's
    texts as a negative: telling them apart needs the binding of colour, shape and place that the VQA asks for.
    """
    total = sum(1 for _ in _batches(len(pixels), cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, cfg.warmup_steps))
    rng = np.random.default_rng(derived_seed(cfg.seed, "clip-hard-negatives"))
    caption_ids: dict[str, int] = {}
    losses: list[float] = []
    model.train()
    progress = tqdm(_batches(len(pixels), cfg), total=total, desc="clip", unit="step")
    for idx in progress:
        texts = [meta[i]["caption"] for i in idx.tolist()]
        if cfg.hard_negatives:
            texts += [swapped_caption(meta[i], rng) for i in idx.tolist()]
        text_ids = torch.tensor([caption_ids.setdefault(t, len(caption_ids)) for t in texts])
        loss = _batch_loss(model, pixels[idx], tokenize_captions(tokenizer, texts), text_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------------------------------
# evaluation: zero-shot accuracy, [CLS] attention probe


@torch.no_grad()
def _embed(model: CLIPModel, pixels: torch.Tensor, tokenizer: PreTrainedTokenizerFast,
           captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Unit-norm image (N, P) and text (M, P) embeddings."""
    images = torch.cat([_features(model.get_image_features(pixel_values=chunk)) for chunk in pixels.split(256)])
    texts = _features(model.get_text_features(**tokenize_captions(tokenizer, captions)))
    return F.normalize(images, dim=-1), F.normalize(texts, dim=-1)


def zero_shot_easy(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, data: dict[str, Any]) -> dict[str, float]:
    """Accuracy of picking the right caption "a <colour> <shape>" among all 24, and of its shape and colour alone."""
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    images, texts = _embed(model, data["pixels"], tokenizer, [f"a {c} {s}" for c, s in pairs])
    predicted = [pairs[i] for i in (images @ texts.t()).argmax(dim=1).tolist()]
    truth = [(m["objects"][0]["color"], m["objects"][0]["shape"]) for m in data["meta"]]
    n = len(truth)
    return {
        "accuracy": sum(p == t for p, t in zip(predicted, truth, strict=True)) / n,
        "color_accuracy": sum(p[0] == t[0] for p, t in zip(predicted, truth, strict=True)) / n,
        "shape_accuracy": sum(p[1] == t[1] for p, t in zip(predicted, truth, strict=True)) / n,
    }


def zero_shot_multi(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, data: dict[str, Any],
                    seed: int) -> dict[str, float]:  # fmt: skip
    """Caption retrieval among all test captions (R@1), and true caption vs one with an attribute swapped."""
    rng = np.random.default_rng(derived_seed(seed, "clip-swaps"))
    captions = [m["caption"] for m in data["meta"]]
    images, texts = _embed(model, data["pixels"], tokenizer, captions)
    retrieved = (images @ texts.t()).argmax(dim=1)
    hits = sum(captions[j] == captions[i] for i, j in enumerate(retrieved.tolist()))
    _, swapped = _embed(model, data["pixels"][:1], tokenizer, [swapped_caption(m, rng) for m in data["meta"]])
    wins = ((images * texts).sum(-1) > (images * swapped).sum(-1)).float().mean().item()
    return {"retrieval_r1": hits / len(captions), "swap_accuracy": wins}


def object_patches(image: np.ndarray, colors: Sequence[str], grid: int) -> np.ndarray:
    """(objects, grid * grid) bool: which patches hold a pixel of each object (one palette colour per object).

    `image` (H, W, 3) uint8 at its stored size; the patch grid is laid over it evenly (H and W divisible by grid).
    """
    height, width = image.shape[:2]
    if height % grid or width % grid:
        raise ValueError(f"image of {width}x{height} does not split into a {grid}x{grid} patch grid")
    out = []
    for color in colors:
        mask = np.all(image == np.array(PALETTE[color], dtype=image.dtype), axis=-1)
        cells = mask.reshape(grid, height // grid, grid, width // grid).any(axis=(1, 3))
        out.append(cells.reshape(-1))
    return np.stack(out)


@torch.no_grad()
def cls_attention(vision_model: Any, pixels: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """Head-mean attention of [CLS] over the patches at encoder layer `layer`: (N, 3, S, S) -> (N, patches).

    `vision_model` must run eager attention (a CLIPVisionModel loaded with attn_implementation="eager").
    """
    rows = []
    for chunk in pixels.split(256):
        attentions = vision_model(pixel_values=chunk, output_attentions=True).attentions  # layers x (B, H, N, N)
        rows.append(attentions[layer].mean(dim=1)[:, 0, 1:])  # (B, patches)
    return torch.cat(rows)


def _random_recall(patches: int, covered: int, k: int) -> float:
    """Chance that k patches drawn at random include at least one of `covered` patches."""
    return 1.0 - math.comb(patches - covered, k) / math.comb(patches, k)


def cls_probe(vision_model: Any, data: dict[str, Any], cfg: ClipConfig) -> dict[str, float]:
    """Where [CLS] looks at layer -2: its attention mass on patches holding an object, against their share of
    patches; and, for the top-k patches by that attention (VisionZip's dominant tokens), the share of objects
    (and of small objects) with at least one patch kept, against k random patches."""
    attn = cls_attention(vision_model, data["pixels"]).numpy()  # (N, patches)
    mass, share = [], []
    hits = {k: [] for k in cfg.probe_topk}
    chance = {k: [] for k in cfg.probe_topk}
    small = []
    for row, meta in zip(attn, data["meta"], strict=True):
        image = np.asarray(read_rgb(data["root"] / meta["image"]))
        cells = object_patches(image, [o["color"] for o in meta["objects"]], cfg.grid)  # (objects, patches)
        union = cells.any(axis=0)
        mass.append(row[union].sum() / row.sum())
        share.append(union.mean())
        order = np.argsort(-row)
        for k in cfg.probe_topk:
            top = np.zeros_like(union)
            top[order[:k]] = True
            hits[k].extend((cells & top).any(axis=1).tolist())
            chance[k].extend(_random_recall(len(row), int(c.sum()), k) for c in cells)
        small.extend(o["small"] for o in meta["objects"])
    small_mask = np.array(small)
    out = {"cls_mass_on_objects": float(np.mean(mass)), "object_patch_share": float(np.mean(share))}
    for k in cfg.probe_topk:
        recall = np.array(hits[k], dtype=float)
        out[f"object_recall@{k}"] = float(recall.mean())
        out[f"random_object_recall@{k}"] = float(np.mean(chance[k]))
        if small_mask.any():
            out[f"small_object_recall@{k}"] = float(recall[small_mask].mean())
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the whole step


def _training_set(data_dir: Path, cfg: ClipConfig, processor: Any,
                  limit: int | None) -> tuple[torch.Tensor, list[dict[str, Any]]]:  # fmt: skip
    """Pixels (N, 3, S, S) and metadata (caption, objects) of the training images of every kind in `cfg.kinds`."""
    splits = [load_split(data_dir, kind, "train", processor, limit) for kind in cfg.kinds]
    return torch.cat([s["pixels"] for s in splits]), [m for s in splits for m in s["meta"]]


def save_clip(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, processor: Any, out_dir: Path) -> None:
    """A CLIP directory as openai/clip-vit-* ship it: config, weights, preprocessor and tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def evaluate_clip(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, out_dir: Path, data_dir: Path,
                  cfg: ClipConfig, limit: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Zero-shot accuracy and the [CLS] probe on each kind's test images; the tower is read back from `out_dir`."""
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    processor = CLIPImageProcessorPil.from_pretrained(out_dir)
    with quiet_load_report():  # the text tower's weights are "unexpected" for a CLIPVisionModel: expected here
        vision = CLIPVisionModel.from_pretrained(out_dir, attn_implementation="eager").eval()
    metrics: dict[str, Any] = {}
    for kind in cfg.kinds:
        data = load_split(data_dir, kind, "test", processor, limit)
        if kind == "easy":
            zero_shot = zero_shot_easy(model, tokenizer, data)
        else:
            zero_shot = zero_shot_multi(model, tokenizer, data, cfg.seed)
        metrics[kind] = {"images": len(data["meta"]), **zero_shot, **cls_probe(vision, data, cfg)}
        logger.info("%s test: %s", kind, json.dumps({k: round(v, 3) for k, v in metrics[kind].items()}))
    return metrics


def write_clip(data_dir: str | Path, out_dir: str | Path, cfg: ClipConfig | None = None,
               limit: int | None = None) -> Path:  # fmt: skip
    """Train the tiny CLIP on `data_dir`'s training captions, save it to `out_dir`, evaluate it (metrics.json).

    Skipped if `out_dir/manifest.json` records the same settings and data. `limit` caps the images per split read.
    """
    cfg = cfg or ClipConfig()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    data_manifests = {kind: json.loads((data_dir / kind / "manifest.json").read_text()) for kind in cfg.kinds}
    expected = json.loads(json.dumps({"version": MANIFEST_VERSION, "config": asdict(cfg), "limit": limit,
                                      "data": data_manifests}))  # fmt: skip
    if is_done(out_dir, expected, "a tiny CLIP"):
        logger.info("%s already trained with these settings: skipping", out_dir)
        return out_dir
    processor = image_processor(cfg.image_size)
    tokenizer = build_caption_tokenizer(cfg.text_max_len)
    pixels, meta = _training_set(data_dir, cfg, processor, limit)
    with seeded(cfg.seed, "mini-clip"):
        model = CLIPModel(clip_model_config(cfg, tokenizer))
    start = time.perf_counter()
    losses = train_clip(model, pixels, meta, tokenizer, cfg)
    seconds = time.perf_counter() - start
    logger.info("trained %d steps on %d images in %.1f s; loss %.3f -> %.3f", len(losses), len(pixels), seconds,
                losses[0], losses[-1])  # fmt: skip
    save_clip(model, tokenizer, processor, out_dir)
    metrics = evaluate_clip(model, tokenizer, out_dir, data_dir, cfg, limit)
    metrics["training"] = {"steps": len(losses), "images": len(pixels), "seconds": seconds,
                           "first_loss": losses[0], "last_loss": losses[-1]}  # fmt: skip
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "manifest.json", expected)
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train, save and evaluate the tiny CLIP."""
    parser = argparse.ArgumentParser(prog="python -m eval.mini.clip", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the folder written by eval.mini.data")
    parser.add_argument("--out", type=Path, required=True, help="the CLIP directory to write")
    parser.add_argument("--kinds", nargs="+", default=list(ClipConfig.kinds), choices=KINDS)
    parser.add_argument("--epochs", type=int, default=ClipConfig.epochs)
    parser.add_argument("--seed", type=int, default=ClipConfig.seed)
    parser.add_argument("--limit", type=int, default=None, help="at most N images per split (smoke runs)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Matrices of width 64 gain nothing from a second thread, and a busy second core stalls them: 0.21 s per batch
    # of 128 on one thread against 0.28 s on two (idle machine), 1-2 s on two next to another job.
    torch.set_num_threads(args.threads)
    cfg = ClipConfig(kinds=tuple(args.kinds), epochs=args.epochs, seed=args.seed, max_steps=args.max_steps)
    write_clip(args.data, args.out, cfg, args.limit)


if __name__ == "__main__":
    main()
