"""Training test pieces: a tiny colour data set, the trainer's flags and logs, label runs per template, a free port,
the tiny checkpoint's LLM alone, and where the answer tokens land once an image's placeholder is expanded."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def write_data(root: Path, n: int = 24) -> tuple[Path, Path]:
    """``n`` one-colour images and a one-question record each, plus a text-only record -> (data.json, images/)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        Image.new("RGB", (48 + 8 * (i % 3), 64), COLOURS[colour]).save(images / f"{i}.png")
        turns = [{"from": "human", "value": "What colour is it?\n<image>"}, {"from": "gpt", "value": colour}]
        records.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi"}]})
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path, images


def train_args(model: Path, data: tuple[Path, Path], out: Path, *extra: str, steps: int = 20) -> list[str]:
    """``llava.train`` flags for a short seeded CPU run on ``data``, then ``extra``."""
    return [
        "--model_name_or_path", str(model), "--data_path", str(data[0]), "--image_folder", str(data[1]),
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", str(steps),
        "--learning_rate", "5e-3", "--logging_steps", "1", "--save_steps", "10", "--report_to", "none",
        "--use_cpu", "True", "--seed", "0", "--lr_scheduler_type", "constant", "--disable_tqdm", "True", *extra,
    ]  # fmt: skip


def logged_losses(trainer) -> list[float]:
    """The training losses the trainer logged, step by step."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def projector_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The projector weights a projector-only run saved in ``folder``."""
    return load_file(str(folder / "mm_projector.safetensors"))


DIALOGUE = [("human", "<image>\nWhat is it?"), ("gpt", "A red square."), ("human", "Sure?"), ("gpt", "Yes.")]
EXPECTED_TARGETS = {  # what each template makes the model produce after its generation prompt, per assistant turn
    "vicuna_v1": [" A red square.</s>", " Yes.</s>"],
    "llava_v1": [" A red square.</s>", " Yes.</s>"],
    "llava_llama_2": [" A red square. </s>", " Yes. </s>"],
    "mistral_instruct": [" A red square. </s>", " Yes. </s>"],
    "mpt": ["A red square.<|im_end|>", "Yes.<|im_end|>"],
    "chatml_direct": ["A red square.<|im_end|>", "Yes.<|im_end|>"],
}


def target_runs(labels: torch.Tensor) -> list[list[int]]:
    """The runs of consecutive supervised tokens (not IGNORE_INDEX) in ``labels`` (L,)."""
    runs, current = [], []
    for token in labels.tolist():
        if token == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token)
    return runs + ([current] if current else [])


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of asking."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_llm(ckpt: Path, out: Path) -> Path:
    """The tiny LLaVA checkpoint's Llama alone (random, seed 0), laid out as a Vicuna folder (stage 1 and 2 start
    from one) -> ``out``."""
    data = json.loads((ckpt / "config.json").read_text())
    keys = {k: v for k, v in data.items() if k in LlamaConfig().to_dict() and not k.startswith("mm_")}
    keys.pop("model_type", None)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**keys)).save_pretrained(out)
    AutoTokenizer.from_pretrained(ckpt).save_pretrained(out)
    return out


def expanded_labels(input_ids: torch.Tensor, labels: torch.Tensor, image_tokens: int) -> list[int]:
    """Labels (L,) of a sample with one image placeholder, restated for the sequence the LLM sees: ``image_tokens``
    unsupervised slots where the placeholder was, each text label where its token lands (index + image_tokens - 1
    after the image)."""
    at = input_ids.tolist().index(IMAGE_TOKEN_INDEX)
    out = [IGNORE_INDEX] * (input_ids.shape[0] - 1 + image_tokens)
    for i, label in enumerate(labels.tolist()):
        if i < at:
            out[i] = label
        elif i > at:
            out[i - 1 + image_tokens] = label
    return out
