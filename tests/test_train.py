"""Training: label masking per template, data checks, the projector/LoRA/full modes, resume, YAML configs, ZeRO-2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.training import (
    COLOURS,
    DIALOGUE,
    EXPECTED_TARGETS,
    free_port,
    logged_losses,
    projector_weights,
    target_runs,
    train_args,
    write_data,
    write_llm,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.model.builder import checkpoint_kind, load_pretrained_model
from llava.tiny import write_tiny_llava
from llava.train.arguments import parse_args
from llava.train.data import (
    DataCollator,
    ImageSettings,
    blank_image,
    check_images,
    normalise_turns,
    render_with_targets,
    take_fraction,
    tokenize_with_targets,
)
from llava.train.model_setup import build_model, set_trainable
from llava.train.train import last_complete_checkpoint, train
from llava.train.trainer import ModalityLengthGroupedSampler, image_path_for_text_only

# ----------------------------------------------------------------------------------------------------------------------
# fixtures: a tiny LLaVA, the same LLM alone (for stage 1), and a tiny data set in LLaVA's format


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def llm(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's Llama alone, as a Vicuna folder is laid out (stage 1 starts from one)."""
    return write_llm(ckpt, tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_data(tmp_path_factory.mktemp("data"))


def _caption_data(root: Path, vqa: Path, images: Path) -> Path:
    """Stage-1 data: one caption per image (the 'plain' template)."""
    records = json.loads(vqa.read_text())[:-1]
    for rec in records:
        rec["conversations"][1]["value"] = f"a {rec['conversations'][1]['value']} square"
    path = root / "captions.json"
    path.write_text(json.dumps(records))
    return path


def _batch(tokenizer, image_processor, config) -> dict:
    from llava.mm_utils import process_images

    ids = torch.tensor([[tokenizer.bos_token_id, IMAGE_TOKEN_INDEX, *tokenizer("What colour is it?").input_ids[1:]]])
    pixels = process_images([Image.new("RGB", (64, 64), COLOURS["red"])], image_processor, config)
    return {"input_ids": ids, "images": pixels}


# ----------------------------------------------------------------------------------------------------------------------
# label masking, checked against hand-written expectations for every template


@pytest.mark.parametrize("template", sorted(EXPECTED_TARGETS))
def test_labels_cover_exactly_the_answers(ckpt: Path, template: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    record = {"conversations": [{"from": f, "value": v} for f, v in DIALOGUE]}
    prompt, spans = render_with_targets(template, normalise_turns(record, 1))
    assert [prompt[a:b] for a, b in spans] == EXPECTED_TARGETS[template]
    ids, labels = tokenize_with_targets(prompt, spans, tokenizer)
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == 1 and labels[ids == IMAGE_TOKEN_INDEX].item() == IGNORE_INDEX
    decoded = [tokenizer.decode(run) for run in target_runs(labels)]
    assert decoded == EXPECTED_TARGETS[template]
    text_ids = ids[ids != IMAGE_TOKEN_INDEX]
    assert tokenizer.decode(text_ids) == tokenizer.bos_token + prompt.replace("<image>", "")


def test_plain_template_is_image_then_caption(ckpt: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    record = {"conversations": [{"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": "a cat"}]}
    prompt, spans = render_with_targets("plain", normalise_turns(record, 1))
    assert prompt == "<image>a cat\n" and [prompt[a:b] for a, b in spans] == ["a cat\n"]
    ids, labels = tokenize_with_targets(prompt, spans, tokenizer)
    assert ids[:2].tolist() == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]
    assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == "a cat\n"


def test_every_registered_template_is_covered() -> None:
    assert set(conv_templates) - set(EXPECTED_TARGETS) == {"v1", "plain", "v0_plain", "mistral_direct"}  # aliases


def test_placeholder_rules() -> None:
    two = {"id": "x", "conversations": [{"from": "human", "value": "<image> a <image>"}, {"from": "gpt", "value": "b"}]}
    assert normalise_turns(two, 2)[0][1] == "<image> a <image>"  # interleaved images stay where they are
    with pytest.raises(ValueError, match="2 '<image>' placeholder"):
        normalise_turns(two, 1)
    bare = {"conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "b"}]}
    assert normalise_turns(bare, 1)[0][1] == "<image>\nWhat?"
    with pytest.raises(ValueError, match="alternate"):
        normalise_turns({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, 0)


# ----------------------------------------------------------------------------------------------------------------------
# data: fraction, image checks, collation, modality grouping


def test_data_fraction_is_seeded_and_ordered() -> None:
    records = [{"id": i} for i in range(100)]
    a, b, c = take_fraction(records, 0.1, 3), take_fraction(records, 0.1, 3), take_fraction(records, 0.1, 4)
    assert a == b and a != c and len(a) == 10
    assert [r["id"] for r in a] == sorted(r["id"] for r in a)
    with pytest.raises(ValueError, match="data_fraction"):
        take_fraction(records, 0.0, 0)


def test_missing_and_corrupt_images_are_reported_before_training(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records = [{"image": name, "conversations": [{}]} for name in ("ok.png", "bad.png", "gone.png", "gone2.png")]
    with pytest.raises(ValueError, match=r"3 image\(s\) in 3 sample\(s\)") as err:
        check_images(records, tmp_path, skip_missing=False)
    assert "gone.png: missing" in str(err.value) and "bad.png: unreadable" in str(err.value)
    assert check_images(records, tmp_path, skip_missing=True) == records[:1]


def test_collator_masks_from_lengths_not_pad_ids() -> None:
    items = [
        {"input_ids": torch.tensor([1, 0, 5]), "labels": torch.tensor([-100, 0, 5]), "images": [], "image_sizes": []},
        {"input_ids": torch.tensor([1]), "labels": torch.tensor([-100]), "images": [], "image_sizes": []},
    ]
    batch = DataCollator(pad_token_id=0)(items)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 0, 5], [-100, -100, -100]] and "images" not in batch


def test_modality_sampler_groups_and_is_reproducible() -> None:
    lengths = [5, -3, 7, -1, 2, 9, -4, 6, 8]
    sampler = ModalityLengthGroupedSampler(lengths, group=2, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths))) and order == list(sampler)
    for i in range(0, len(order) - 2, 2):  # the last mega-batch holds both modalities' leftovers
        pair = [lengths[j] > 0 for j in order[i : i + 2]]
        assert len(set(pair)) == 1, "a mega-batch mixes modalities"
    sampler.set_epoch(1)
    assert list(sampler) != order


# ----------------------------------------------------------------------------------------------------------------------
# configs


def test_yaml_config_then_flags_override(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": "m", "data_path": "d", "learning_rate": 0.5, "lora_r": 8}))
    model_args, data_args, args = parse_args(["--config", str(config), "--lora_r", "4", "--output_dir", "o"])
    assert (model_args.model_name_or_path, data_args.data_path, args.learning_rate, args.lora_r) == ("m", "d", 0.5, 4)
    config.write_text(yaml.safe_dump({"model_name_or_path": "m", "learning_rte": 1.0}))
    with pytest.raises(ValueError, match="learning_rte"):
        parse_args(["--config", str(config)])


def test_shipped_configs_parse() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted((root / "train").glob("*.yaml")):
        model_args, _, _ = parse_args(["--config", str(path), "--output_dir", "o", "--bf16", "False"])  # CPU here
        assert model_args.model_name_or_path, path
    for path in sorted((root / "deepspeed").glob("*.json")):
        assert "zero_optimization" in json.loads(path.read_text()), path


# ----------------------------------------------------------------------------------------------------------------------
# the modes, end to end on the tiny model


@pytest.fixture(scope="module")
def visionzip_run(ckpt: Path, data, tmp_path_factory: pytest.TempPathFactory):
    """VisionZip‡: the projector alone, on 6+2 compressed tokens, 20 steps (checkpoints at 10 and 20)."""
    out = tmp_path_factory.mktemp("vz")
    extra = ("--tune_mm_mlp_adapter", "True", "--visionzip_dominant", "6", "--visionzip_contextual", "2")
    return train(train_args(ckpt, data, out, *extra)), out, extra


def test_projector_mode_trains_only_the_projector(ckpt: Path, visionzip_run) -> None:
    trainer, out, _ = visionzip_run
    losses = logged_losses(trainer)
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])
    before = load_file(str(ckpt / "model.safetensors"))
    after = trainer.model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert changed and all(k.startswith("model.mm_projector.") for k in changed)
    tower = load_file(str(ckpt.parent / "clip" / "model.safetensors"))  # the tower comes from the CLIP folder
    prefix = "model.vision_tower.vision_tower."
    tower_after = {"vision_model." + k.removeprefix(prefix): v for k, v in after.items() if k.startswith(prefix)}
    assert tower_after and all(torch.equal(v, tower[k]) for k, v in tower_after.items())
    saved = json.loads((out / "config.json").read_text())
    assert checkpoint_kind(out) == "projector" and saved["visionzip"] and saved["use_cache"] is True
    assert len(trainer.train_dataset) == 24, "the text-only sample teaches the projector nothing: left out"


def test_saved_projector_reloads_with_the_trained_logits(ckpt: Path, visionzip_run) -> None:
    trainer, out, _ = visionzip_run
    tokenizer, model, processor, _ = load_pretrained_model(str(out), model_base=str(ckpt), device="cpu")
    assert model.config.visionzip_config().tokens == 8
    batch = _batch(tokenizer, processor, model.config)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, trainer.model(**batch).logits)


class StepRecorder(TrainerCallback):
    """The optimisation steps a run actually takes."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.seen.append(state.global_step)


def test_resume_continues_at_the_saved_step_and_matches(ckpt: Path, data, visionzip_run, tmp_path: Path) -> None:
    _, full_run, extra = visionzip_run
    shutil.copytree(full_run / "checkpoint-10", tmp_path / "checkpoint-10")  # what a job killed after step 12 leaves
    steps = StepRecorder()
    resumed = train(train_args(ckpt, data, tmp_path, *extra, "--resume_from_checkpoint", "auto"), callbacks=[steps])
    assert steps.seen == list(range(11, 21)) and resumed.state.global_step == 20
    for key, value in projector_weights(full_run).items():
        torch.testing.assert_close(projector_weights(tmp_path)[key], value, rtol=0, atol=1e-6)


def test_stage1_from_llm_then_lora(ckpt: Path, llm: Path, data, tmp_path: Path) -> None:
    clip = ckpt.parent / "clip"
    captions = (_caption_data(tmp_path, *data), data[1])
    stage1 = tmp_path / "stage1"
    train(train_args(llm, captions, stage1, "--version", "plain", "--vision_tower", str(clip), "--tune_mm_mlp_adapter",
                "True", "--mm_projector_type", "mlp2x_gelu", steps=4))  # fmt: skip
    assert checkpoint_kind(stage1) == "projector"
    again = tmp_path / "stage1-again"  # the new projector's initial weights come from --seed: a rerun is identical
    train(train_args(llm, captions, again, "--version", "plain", "--vision_tower", str(clip), "--tune_mm_mlp_adapter",
                "True", "--mm_projector_type", "mlp2x_gelu", steps=4))  # fmt: skip
    assert all(torch.equal(v, projector_weights(again)[k]) for k, v in projector_weights(stage1).items())
    lora_out = tmp_path / "lora"
    trainer = train(train_args(llm, data, lora_out, "--vision_tower", str(clip), "--mm_projector_type", "mlp2x_gelu",
                          "--pretrain_mm_mlp_adapter", str(stage1 / "mm_projector.bin"), "--lora_enable", "True",
                          "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "2e-2", steps=4))  # fmt: skip
    assert (lora_out / "adapter_config.json").is_file() and (lora_out / "non_lora_trainables.bin").is_file()
    tokenizer, merged, processor, _ = load_pretrained_model(str(lora_out), model_base=str(llm), device="cpu")
    batch = _batch(tokenizer, processor, merged.config)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, trainer.model(**batch).logits, rtol=1e-4, atol=1e-4)
        base = trainer.model.get_base_model()
        with trainer.model.disable_adapter():
            unadapted = base(**batch).logits
    assert not torch.allclose(unadapted, merged(**batch).logits, atol=1e-4), "LoRA changed nothing"


def test_full_finetune_saves_a_full_checkpoint(ckpt: Path, data, tmp_path: Path) -> None:
    trainer = train(train_args(ckpt, data, tmp_path, "--learning_rate", "1e-3", "--save_strategy", "no", steps=3))
    assert checkpoint_kind(tmp_path) == "full"
    tokenizer, model, processor, _ = load_pretrained_model(str(tmp_path), device="cpu")
    batch = _batch(tokenizer, processor, model.config)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, trainer.model(**batch).logits)


# ----------------------------------------------------------------------------------------------------------------------
# the frozen tower under gradient checkpointing, and text-only batches


def _model_to_train(ckpt: Path, out: Path, mode: str, *extra: str):
    """The model as ``train`` builds it, with the Trainer's activation checkpointing on, in training mode."""
    model_args, data_args, args = parse_args(["--model_name_or_path", str(ckpt), "--data_path", "unused",
                                              "--output_dir", str(out), "--use_cpu", "True", *extra])  # fmt: skip
    model, tokenizer = build_model(model_args, data_args, args)
    model = set_trainable(model, mode, model_args, args)
    model.activation_checkpointing_enable()
    return model.train(), tokenizer


def _saved_in_forward(model, batch: dict) -> dict:
    """Bytes autograd saves for backward in one forward: while the tower runs, and elsewhere; and whether the
    tower's output (the projector's input) requires grad."""
    record = {"tower": 0, "rest": 0, "inside": False, "output_requires_grad": None}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        record["tower" if record["inside"] else "rest"] += tensor.numel() * tensor.element_size()
        return tensor

    def enter(module, args) -> None:
        record["inside"] = True

    def leave(module, args) -> None:  # the projector runs right after the tower, on its output
        record.update(inside=False, output_requires_grad=args[0].requires_grad)

    hooks = [model.get_vision_tower().vision_tower.get_input_embeddings().register_forward_pre_hook(enter),
             model.get_model().mm_projector.register_forward_pre_hook(leave)]  # fmt: skip
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(**batch).loss
    finally:
        for hook in hooks:
            hook.remove()
    loss.backward()
    return record


@pytest.mark.parametrize("visionzip", [False, True], ids=["features", "visionzip"])
def test_frozen_tower_keeps_no_graph_under_gradient_checkpointing(ckpt: Path, tmp_path: Path, visionzip: bool) -> None:
    """``enable_input_require_grads`` makes CLIP's patch embedding require grad; the frozen tower must still run
    without a graph. Reference: the same step with the tower trainable, which keeps its graph as the frozen one
    used to."""
    extra = ("--visionzip_dominant", "6", "--visionzip_contextual", "2") if visionzip else ()
    model, tokenizer = _model_to_train(ckpt, tmp_path, "full", "--gradient_checkpointing", "True", *extra)
    batch = _batch(tokenizer, model.get_vision_tower().image_processor(), model.config)
    batch["labels"] = batch["input_ids"].clone()
    frozen = _saved_in_forward(model, batch)
    assert frozen["output_requires_grad"] is False and frozen["tower"] == 0
    assert all(p.grad is not None for p in model.get_model().mm_projector.parameters()), "the projector still learns"
    model.get_vision_tower().requires_grad_(True)
    trained = _saved_in_forward(model, batch)
    assert trained["output_requires_grad"] is True and trained["tower"] > 0
    assert frozen["rest"] <= trained["rest"]
    assert frozen["tower"] + frozen["rest"] < trained["tower"] + trained["rest"]


def _module_order(model, batch: dict) -> tuple[list[str], torch.Tensor]:
    """The order in which a forward enters the tower, the projector, the token embeddings and the first LLM layer."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    watched = {"tower": base.get_vision_tower().vision_tower.get_input_embeddings(),
               "projector": base.get_model().mm_projector, "embed": base.get_input_embeddings(),
               "layer0": base.get_model().layers[0]}  # fmt: skip
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda *_, name=name: order.append(name)) for name, m in watched.items()]
    try:
        loss = model(**batch).loss
    finally:
        for hook in hooks:
            hook.remove()
    return order, loss


@pytest.mark.parametrize(
    ("mode", "next"), [("full", False), ("lora", False), ("full", True)], ids=["full", "lora", "v1.6"]
)
def test_text_only_batch_runs_the_image_path_with_zero_weight(
    ckpt: Path, tmp_path: Path, mode: str, next: bool
) -> None:
    """What keeps ZeRO-3 ranks in step: a text-only batch enters the same modules in the same order as an image
    batch, its loss is the text path's, and the projector (and LLaVA-1.6's image_newline) get zero gradients."""
    checkpoint = write_tiny_llava(tmp_path / "v16", next=True) if next else ckpt
    extra = ("--lora_enable", "True", "--lora_r", "4", "--lora_dropout", "0") if mode == "lora" else ()
    model, tokenizer = _model_to_train(checkpoint, tmp_path / "out", mode, "--gradient_checkpointing", "True", *extra)
    base = model.get_base_model() if mode == "lora" else model
    tower = base.get_vision_tower()
    settings = ImageSettings(tower.image_processor(), base.config.image_aspect_ratio, base.config.image_grid_pinpoints)
    blank, size = blank_image(settings, tower.config.image_size)
    ids = [tokenizer("Say hi. Hi there.").input_ids, tokenizer("Hi.").input_ids]
    longest = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (longest - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids])
    text = {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, IGNORE_INDEX)}
    plain = model(**text).loss  # the reference: the text path alone
    with image_path_for_text_only(base, blank, size):
        text_order, loss = _module_order(model, text)
    loss.backward()
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    image_params = [*base.get_model().mm_projector.parameters(), *([base.get_model().image_newline] if next else [])]
    assert all(p.grad is not None and not p.grad.any() for p in image_params)
    placeholder = torch.full_like(input_ids[:, :1], IMAGE_TOKEN_INDEX)
    with_images = {"input_ids": torch.cat([input_ids[:, :1], placeholder, input_ids[:, 1:]], dim=1),
                   "attention_mask": torch.cat([mask[:, :1], mask], dim=1), "images": [blank, blank],
                   "image_sizes": [size, size]}  # fmt: skip
    with_images["labels"] = with_images["input_ids"].masked_fill(with_images["attention_mask"] == 0, IGNORE_INDEX)
    with image_path_for_text_only(base, blank, size):  # a batch with images passes the hook unchanged
        image_order, _ = _module_order(model, with_images)
    assert text_order == image_order and text_order[:2] == ["tower", "projector"]


def test_resume_auto_skips_a_half_written_checkpoint(tmp_path: Path) -> None:
    for step, complete in ((5, True), (10, True), (15, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    (tmp_path / "checkpoint-10" / "trainer_state.json").unlink()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")
    assert last_complete_checkpoint(tmp_path / "checkpoint-15") is None


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_steps_on_cpu(ckpt: Path, data, tmp_path: Path, stage: str) -> None:
    """In a subprocess, as the launcher runs it: a process group (gloo) of one, DeepSpeed's CPU accelerator."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    config = Path(__file__).resolve().parents[1] / f"configs/deepspeed/{stage}.json"
    args = train_args(ckpt, data, tmp_path, "--deepspeed", str(config), "--tune_mm_mlp_adapter", "True", steps=2)
    at = args.index("--use_cpu")
    del args[at : at + 2]  # DeepSpeed picks its CPU accelerator itself
    done = subprocess.run([sys.executable, "-m", "llava.train.train", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "checkpoint-2" / "global_step2").is_dir(), "no DeepSpeed engine checkpoint was written"
    assert checkpoint_kind(tmp_path) == "projector"
    saved = projector_weights(tmp_path)  # gathered from the ZeRO-3 partitions: full shapes, trained values
    base = load_file(str(ckpt / "model.safetensors"))
    assert all(v.shape == base[k].shape and not torch.equal(v, base[k]) for k, v in saved.items())
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 2
