"""Stage 2 with VisionZip in the loop (the paper's Tables 11 and 17): the LLM and projector learn on the compressed
sequence (labels where the answer tokens land, loss and gradients against a hand-built sequence), full fine-tuning
saves, reloads and resumes with its budget, LoRA on LLaVA-NeXT from the LLM with the NeXT config, and the scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.training import expanded_labels, logged_losses, target_runs, train_args, write_data, write_llm
from safetensors.torch import load_file
from transformers import TrainerCallback

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import parse_grid_pinpoints
from llava.model.builder import checkpoint_kind, load_pretrained_model
from llava.tiny import write_projector_only
from llava.train.arguments import parse_args
from llava.train.data import DataCollator, ImageSettings, LazySupervisedDataset, read_records
from llava.train.model_setup import build_model, set_trainable
from llava.train.train import train

REPO = Path(__file__).resolve().parents[1]
DOMINANT, CONTEXTUAL = 6, 2  # per view: 8 of the tiny tower's 64 patches
VISIONZIP = ("--visionzip_dominant", str(DOMINANT), "--visionzip_contextual", str(CONTEXTUAL))
LLM_PREFIX = "model.layers."
NEWLINE = "model.image_newline"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_data(tmp_path_factory.mktemp("data"), n=12)


def _model_to_train(ckpt: Path, out: Path, *extra: str):
    """The model as ``train`` builds it for full fine-tuning with VisionZip, activation checkpointing on."""
    model_args, data_args, args = parse_args(["--model_name_or_path", str(ckpt), "--data_path", "unused",
                                              "--output_dir", str(out), "--use_cpu", "True", *VISIONZIP,
                                              "--gradient_checkpointing", "True", *extra])  # fmt: skip
    model, tokenizer = build_model(model_args, data_args, args)
    model = set_trainable(model, "full", model_args, args)
    model.activation_checkpointing_enable()
    return model.train(), tokenizer


def _items(model, tokenizer, data: tuple[Path, Path], indices: list[int]) -> list[dict]:
    """Samples as the training data set makes them (the v1 template, the model's image settings)."""
    settings = ImageSettings(model.get_vision_tower().image_processor(), model.config.image_aspect_ratio,
                             model.config.image_grid_pinpoints)  # fmt: skip
    dataset = LazySupervisedDataset(read_records(data[0]), tokenizer, "v1", data[1], settings, 2048)
    return [dataset[i] for i in indices]


def _views(item: dict) -> int:
    pixels = item["images"][0]
    return pixels.shape[0] if pixels.dim() == 4 else 1


@pytest.mark.parametrize("family", ["v15", "v16"])
def test_labels_follow_the_answer_into_the_compressed_sequence(tiny_pair, data, tmp_path: Path, family: str) -> None:
    """Reference: each sample's labels restated by hand at the compressed length (views x (dominant + contextual)
    image slots), and the supervised tokens decoding to that sample's answer."""
    model, tokenizer = _model_to_train(tiny_pair[family], tmp_path)
    indices = [0, 1, 5]  # three image sizes (AnyRes: different crop grids), so rows are padded differently
    items = _items(model, tokenizer, data, indices)
    batch = DataCollator(tokenizer.pad_token_id)(items)
    with torch.no_grad():
        built = model.multimodal_batch(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"],
                                       batch["image_sizes"])  # fmt: skip
    answers = [json.loads(data[0].read_text())[i]["conversations"][1]["value"] for i in indices]
    for row, (item, answer) in enumerate(zip(items, answers, strict=True)):
        image_tokens = _views(item) * (DOMINANT + CONTEXTUAL)
        expected = expanded_labels(item["input_ids"], item["labels"], image_tokens)
        length = int(built.attention_mask[row].sum())
        assert length == len(expected) == item["input_ids"].shape[0] - 1 + image_tokens
        assert built.labels[row, :length].tolist() == expected
        assert (built.labels[row, length:] == IGNORE_INDEX).all()
        assert [tokenizer.decode(run) for run in target_runs(torch.tensor(expected))] == [f" {answer}</s>"]
    if family == "v16":
        assert max(_views(item) for item in items) > 1, "no sample was cut into AnyRes crops"


def _hand_loss(model, items: list[dict]) -> torch.Tensor:
    """The stage-2 loss restated: per sample the text embeddings around the image's features (the model's own,
    compressed), the bare decoder and head, cross-entropy of each answer token from the position before it."""
    embed, terms = model.get_input_embeddings(), []
    for item in items:
        ids, labels = item["input_ids"], item["labels"]
        at = ids.tolist().index(IMAGE_TOKEN_INDEX)
        features = model.image_features([item["images"][0]], item["image_sizes"])[0]  # (K, C)
        assert features.shape[0] == _views(item) * (DOMINANT + CONTEXTUAL)
        sequence = torch.cat([embed(ids[:at]), features, embed(ids[at + 1 :])])[None]  # (1, L - 1 + K, C)
        logits = model.lm_head(model.get_model()(inputs_embeds=sequence).last_hidden_state)[0]  # (L - 1 + K, V)
        for i in range(at + 1, ids.shape[0]):  # the answers come after the image in this data
            if labels[i] != IGNORE_INDEX:
                where = i - 1 + features.shape[0]
                terms.append(F.cross_entropy(logits[where - 1], labels[i]))
    return torch.stack(terms).mean()


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("family", ["v15", "v16"])
def test_loss_and_gradients_are_those_of_the_compressed_sequence(tiny_pair, data, tmp_path: Path, family) -> None:
    """One stage-2 step's loss and every gradient equal the hand-built sequence's; the LLM's layers, embeddings and
    head and the projector get gradients, the tower none."""
    model, tokenizer = _model_to_train(tiny_pair[family], tmp_path)
    items = _items(model, tokenizer, data, [0, 4])
    batch = DataCollator(tokenizer.pad_token_id)(items)
    loss = model(**batch).loss
    loss.backward()
    trained = _grads(model)
    reference = _hand_loss(model, items)
    reference.backward()
    by_hand = _grads(model)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert trained.keys() == by_hand.keys()
    for name, grad in trained.items():
        torch.testing.assert_close(grad, by_hand[name], rtol=1e-4, atol=1e-6, msg=name)
    llm = [n for n in trained if n.startswith(LLM_PREFIX)]
    assert {n.split(".")[2] for n in llm} == {str(i) for i in range(model.config.num_hidden_layers)}
    assert all(trained[n].abs().sum() > 0 for n in [*llm, "lm_head.weight", "model.embed_tokens.weight"])
    assert any(n.startswith("model.mm_projector.") and trained[n].abs().sum() > 0 for n in trained)
    assert not any("vision_tower" in n for n in trained)


class StepRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.seen.append(state.global_step)


@pytest.fixture(scope="module")
def full_run(tiny_pair, data, tmp_path_factory: pytest.TempPathFactory):
    """Full fine-tuning of LLaVA-1.5 with VisionZip 6+2, 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("full-vz")
    extra = (*VISIONZIP, "--learning_rate", "1e-3", "--save_steps", "2", "--gradient_checkpointing", "True")
    return train(train_args(tiny_pair["v15"], data, out, *extra, steps=4)), out, extra


def test_full_finetune_trains_the_llm_and_saves_its_budget(tiny_pair, data, full_run) -> None:
    trainer, out, _ = full_run
    assert checkpoint_kind(out) == "full" and all(torch.isfinite(torch.tensor(logged_losses(trainer))))
    saved = json.loads((out / "config.json").read_text())
    assert (saved["visionzip"]["dominant"], saved["visionzip"]["contextual"]) == (DOMINANT, CONTEXTUAL)
    before, after = load_file(str(tiny_pair["v15"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in changed if k.startswith(LLM_PREFIX)} == {k for k in before if k.startswith(LLM_PREFIX)}
    assert not any("vision_tower" in k for k in changed)
    tokenizer, model, _, _ = load_pretrained_model(str(out), device="cpu")
    assert model.config.visionzip_config().tokens == DOMINANT + CONTEXTUAL  # reloads with its budget
    item = _items(model, tokenizer, data, [2])[0]
    ids, pixels = item["input_ids"][None], item["images"][0][None]
    trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, images=pixels).logits
        torch.testing.assert_close(logits, trainer.model(input_ids=ids, images=pixels).logits)
    assert logits.shape[1] == ids.shape[1] - 1 + DOMINANT + CONTEXTUAL


def test_full_finetune_with_visionzip_resumes_to_the_same_weights(tiny_pair, data, full_run, tmp_path: Path) -> None:
    _, out, extra = full_run
    shutil.copytree(out / "checkpoint-2", tmp_path / "checkpoint-2")  # what a job killed after step 3 leaves
    steps = StepRecorder()
    resumed = train(train_args(tiny_pair["v15"], data, tmp_path, *extra, "--resume_from_checkpoint", "auto", steps=4),
                    callbacks=[steps])  # fmt: skip
    assert steps.seen == [3, 4] and resumed.state.global_step == 4
    reference, again = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    for key, value in reference.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6, msg=key)


def _next_from_llm(tiny_pair, tmp_path: Path, config: str) -> tuple[Path, list[str]]:
    """The tiny LLM alone and the flags scripts/v1_6/*.sh give it (``config``: the NeXT YAML), with the tiny tower,
    a stage-1 projector and AnyRes grids in the tiny tower's crop size."""
    llm = write_llm(tiny_pair["v16"], tmp_path / "llm")
    projector = write_projector_only(tmp_path / "stage1", tiny_pair["v15"], seed=1) / "mm_projector.bin"
    clip = tiny_pair["v16"].parent / "clip"
    side = json.loads((clip / "config.json").read_text())["vision_config"]["image_size"]
    pinpoints = str([[side, 2 * side], [2 * side, side], [2 * side, 2 * side]])
    return llm, ["--config", str(REPO / "configs/train" / config), "--vision_tower", str(clip),
                 "--pretrain_mm_mlp_adapter", str(projector), "--image_grid_pinpoints", pinpoints, "--bf16", "False",
                 "--dataloader_num_workers", "0"]  # fmt: skip


def test_a_new_image_newline_is_drawn_not_left_unset(tiny_pair, data, tmp_path: Path) -> None:
    """NeXT's stage 2 from a plain LLM without VisionZip (scripts/v1_6/finetune.sh): the new image_newline, which
    every AnyRes image's rows end with, is N(0, 1/hidden) from the seed (from_pretrained left it uninitialised);
    a checkpoint's own newline is kept; the first loss is finite."""
    llm, flags = _next_from_llm(tiny_pair, tmp_path, "finetune_llava16.yaml")
    common = ["--data_path", "unused", "--output_dir", str(tmp_path / "out"), "--use_cpu", "True", *flags]

    def newline(path: Path):
        torch.manual_seed(0)
        model, tokenizer = build_model(*parse_args(["--model_name_or_path", str(path), *common]))
        return model, tokenizer, model.get_model().image_newline.detach()

    model, tokenizer, first = newline(llm)
    assert torch.isfinite(first).all() and torch.equal(first, newline(llm)[2])
    assert 0.5 < float(first.std() * first.numel() ** 0.5) < 2.0
    assert torch.equal(newline(tiny_pair["v16"])[2], load_file(str(tiny_pair["v16"] / "model.safetensors"))[NEWLINE])
    item = _items(model, tokenizer, data, [1])[0]
    assert _views(item) > 1
    batch = DataCollator(tokenizer.pad_token_id)([item])
    assert torch.isfinite(model(**batch).loss)


def test_lora_on_llava_next_from_the_llm_with_the_next_config(tiny_pair, data, tmp_path: Path) -> None:
    """scripts/v1_6/finetune_lora.sh's job on the tiny model: the NeXT config (AnyRes, spatial_unpad) from a plain
    LLM and a stage-1 projector, VisionZip per crop; the adapter reloads on the LLM with the budget and the logits."""
    llm, flags = _next_from_llm(tiny_pair, tmp_path, "finetune_lora_llava16.yaml")
    out = tmp_path / "lora"
    extra = (*flags, "--lora_r", "4", "--lora_alpha", "8", "--save_strategy", "no", *VISIONZIP)
    trainer = train(train_args(llm, data, out, *extra, steps=2))
    saved = json.loads((out / "config.json").read_text())
    assert (saved["image_aspect_ratio"], saved["mm_patch_merge_type"]) == ("anyres", "spatial_unpad")
    assert saved["visionzip"]["dominant"] == DOMINANT and saved["visionzip_budget"] == "per_crop"
    tokenizer, merged, _, _ = load_pretrained_model(str(out), model_base=str(llm), device="cpu")
    assert merged.config.visionzip_config().tokens == DOMINANT + CONTEXTUAL
    assert len(parse_grid_pinpoints(merged.config.image_grid_pinpoints)) == 3
    item = _items(merged, tokenizer, data, [1])[0]
    assert _views(item) > 1
    ids, pixels, sizes = item["input_ids"][None], item["images"], item["image_sizes"]
    trainer.model.eval()
    with torch.no_grad():
        logits = merged(input_ids=ids, images=pixels, image_sizes=sizes).logits
        torch.testing.assert_close(logits, trainer.model(input_ids=ids, images=pixels, image_sizes=sizes).logits,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    assert logits.shape[1] == ids.shape[1] - 1 + _views(item) * (DOMINANT + CONTEXTUAL)
    newline = trainer.model.get_base_model().get_model().image_newline  # new on the LLM: trained and saved with it
    assert newline.requires_grad and torch.equal(merged.get_model().image_newline, newline.detach())


# ----------------------------------------------------------------------------------------------------------------------
# the scripts, with a stand-in `deepspeed` that records what it was asked to run

SCRIPTS = {  # script -> (the config it passes, whether it trains LoRA)
    "scripts/v1_5/finetune.sh": ("configs/train/finetune_llava15.yaml", False),
    "scripts/v1_5/finetune_lora.sh": ("configs/train/finetune_lora_llava15.yaml", True),
    "scripts/v1_6/finetune.sh": ("configs/train/finetune_llava16.yaml", False),
    "scripts/v1_6/finetune_lora.sh": ("configs/train/finetune_lora_llava16.yaml", True),
}


def _run_script(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    stub = tmp_path / "bin" / "deepspeed"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "ARGS_OUT": str(tmp_path / "args"), **env}
    return subprocess.run(["bash", str(REPO / script)], env=env, capture_output=True, text=True)


def _launched(tmp_path: Path) -> list[str]:
    """The flags the script gave llava/train/train.py, without --deepspeed (checked to name a shipped config)."""
    argv = (tmp_path / "args").read_text().splitlines()
    flags = argv[argv.index("llava/train/train.py") + 1 :]
    at = flags.index("--deepspeed")
    assert (REPO / flags[at + 1]).is_file()
    return flags[:at] + flags[at + 2 :]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_stage2_scripts_pass_the_budget_or_none(script: str, tmp_path: Path) -> None:
    config, lora = SCRIPTS[script]
    done = _run_script(script, tmp_path, DOMINANT="54", CONTEXTUAL="10")
    assert done.returncode == 0, done.stderr
    flags = _launched(tmp_path)
    assert flags[flags.index("--config") + 1] == config
    model_args, _, args = parse_args([*flags, "--bf16", "False"])
    vz = model_args.visionzip(-2)
    assert (vz.dominant, vz.contextual, model_args.visionzip_budget) == (54, 10, "per_crop")
    assert args.lora_enable is lora and args.output_dir.endswith("-vz64")
    done = _run_script(script, tmp_path, DOMINANT="108", CONTEXTUAL="20", BUDGET="total")
    model_args, _, args = parse_args([*_launched(tmp_path), "--bf16", "False"])
    assert model_args.visionzip_budget == "total" and args.output_dir.endswith("-vz128-total")
    assert _run_script(script, tmp_path).returncode == 0
    model_args, _, args = parse_args([*_launched(tmp_path), "--bf16", "False"])
    assert model_args.visionzip(-2) is None and "-vz" not in args.output_dir
    half = _run_script(script, tmp_path, DOMINANT="54")
    assert half.returncode == 2 and "set both DOMINANT and CONTEXTUAL" in half.stderr
