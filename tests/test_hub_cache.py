"""Hub ids (``liuhaotian/llava-v1.5-7b``...) resolved offline from a hub cache: builder, tower, training, run_llava,
the lmms-eval runner and the Table 1/2 VisionZip‡ rows (projector-only outputs on their ``model_base``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.hub_cache import CLIP_ID, LLM_ID, PROJECTOR_ID, V15_ID, V16_ID, TinyHub, build_tiny_hub, offline_hub
from lmms_eval.utils import simple_parse_args_string
from PIL import Image
from safetensors.torch import load_file

from eval import grid
from eval.options import ModelOptions
from eval.runner import LlavaRunner
from eval.tables.spec import load_spec, resolve_spec_path
from llava import inference
from llava.constants import IMAGE_TOKEN_INDEX
from llava.eval import run_llava
from llava.mm_utils import process_images
from llava.model.builder import checkpoint_kind, load_pretrained_model, local_checkpoint
from llava.model.hub import _bin_patterns
from llava.tiny import write_projector_only
from llava.train.train import train
from visionzip import VisionZipConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "llava/serve/examples/chelsea.jpg"
TRAIN_ARGS = ("--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none", "--use_cpu",
              "True", "--seed", "0", "--save_strategy", "no", "--disable_tqdm", "True")  # fmt: skip


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> TinyHub:
    tiny = build_tiny_hub(tmp_path_factory.mktemp("hub"))
    with offline_hub(tiny.hf_home):
        yield tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Four one-colour images with a one-turn question each, in LLaVA's JSON format."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    records = []
    for i, (name, rgb) in enumerate({"red": (220, 30, 30), "blue": (30, 30, 220)}.items()):
        for j in range(2):
            Image.new("RGB", (48 + 8 * j, 64), rgb).save(root / "images" / f"{i}{j}.png")
            turns = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": name}]
            records.append({"id": f"{i}{j}", "image": f"{i}{j}.png", "conversations": turns})
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json", root / "images"


def _batch(tokenizer, processor, config) -> dict:
    ids = torch.tensor([[tokenizer.bos_token_id, IMAGE_TOKEN_INDEX, *tokenizer("What is it?").input_ids[1:]]])
    image = Image.open(SAMPLE).convert("RGB")
    return {"input_ids": ids, "images": process_images([image], processor, config), "image_sizes": [image.size]}


def _logits(model_path: str, model_base: str | None = None) -> torch.Tensor:
    tokenizer, model, processor, _ = load_pretrained_model(model_path, model_base, device="cpu")
    with torch.no_grad():
        return model(**_batch(tokenizer, processor, model.config)).logits


def test_names_resolve_through_the_cache_only(hub: TinyHub, tmp_path: Path) -> None:
    resolved = Path(local_checkpoint(V15_ID))
    assert resolved.is_relative_to(hub.hf_home / "hub") and (resolved / "config.json").is_file()
    assert local_checkpoint(str(tmp_path)) == str(tmp_path)  # a local folder as is
    with pytest.raises(FileNotFoundError, match="nobody/absent"):
        local_checkpoint("nobody/absent")  # offline and not cached
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub id"):
        local_checkpoint("not/a/hub/id")


LAYOUTS = {  # files a first, safetensors-only fetch brought -> the .bin files still to fetch
    "safetensors full": (["config.json", "model.safetensors"], []),
    "bin full": (["config.json", "pytorch_model.bin.index.json"], ["pytorch_model*.bin", "mm_projector.bin"]),
    "projector-only": (["config.json"], ["pytorch_model*.bin", "mm_projector.bin"]),
    "LoRA": (["adapter_config.json", "adapter_model.safetensors"], ["pytorch_model*.bin", "non_lora_trainables.bin"]),
    "LoRA, bin": (["adapter_config.json"], ["pytorch_model*.bin", "adapter_model.bin", "non_lora_trainables.bin"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bin_files_are_fetched_only_without_safetensors(tmp_path: Path, layout: str) -> None:
    present, expected = LAYOUTS[layout]
    for name in present:
        (tmp_path / name).write_text("{}")
    assert _bin_patterns(tmp_path) == expected


@pytest.mark.parametrize("repo_id", [V15_ID, V16_ID])
def test_load_pretrained_model_from_a_hub_id(hub: TinyHub, repo_id: str) -> None:
    tokenizer, model, processor, _ = load_pretrained_model(repo_id, device="cpu")
    tower = model.get_vision_tower()
    assert tower.tower_name == CLIP_ID  # the config keeps naming the tower by id
    if repo_id == V15_ID:  # LLaVA-1.5 carries no tower: it is the CLIP repository's, read from the cache
        clip = load_file(str(hub.sources[CLIP_ID] / "model.safetensors"))
        state = tower.vision_tower.state_dict()
        assert all(torch.equal(value, clip["vision_model." + key]) for key, value in state.items())
    with torch.no_grad():
        logits = model(**_batch(tokenizer, processor, model.config)).logits
    torch.testing.assert_close(logits, _logits(str(hub.sources[repo_id])), rtol=0, atol=0)  # the local folder


def test_run_llava_from_a_hub_id(hub: TinyHub) -> None:
    argv = ["--image-file", str(SAMPLE), "--query", "What is it?", "--device", "cpu", "--max-new-tokens", "6"]
    by_id = run_llava.main(["--model-path", V16_ID, *argv, "--visionzip-dominant", "6", "--visionzip-contextual", "2"])
    local = run_llava.main(["--model-path", str(hub.sources[V16_ID]), *argv, "--visionzip-dominant", "6",
                            "--visionzip-contextual", "2"])  # fmt: skip
    assert by_id == {**local, "ttft_ms": by_id["ttft_ms"]}


def test_training_from_hub_ids(hub: TinyHub, data: tuple[Path, Path], tmp_path: Path) -> None:
    """VisionZip‡ from a LLaVA id, then stage 1 from an LLM id with the tower and the stage-1 projector by id."""
    data_args = ("--data_path", str(data[0]), "--image_folder", str(data[1]))
    vz = tmp_path / "visionzip"
    train(["--model_name_or_path", V15_ID, *data_args, "--output_dir", str(vz), "--tune_mm_mlp_adapter", "True",
           "--visionzip_dominant", "6", "--visionzip_contextual", "2", "--max_steps", "2", *TRAIN_ARGS])  # fmt: skip
    saved = json.loads((vz / "config.json").read_text())
    assert checkpoint_kind(vz) == "projector" and saved["mm_vision_tower"] == CLIP_ID
    result = run_llava.main(["--model-path", str(vz), "--model-base", V15_ID, "--image-file", str(SAMPLE),
                             "--query", "What colour?", "--device", "cpu", "--max-new-tokens", "2"])  # fmt: skip
    assert result["tokens_after"] == 6 + 2  # the budget it was trained on, with no flag given

    stage1 = tmp_path / "stage1"  # learning rate 0: the projector stays the one read from the hub id
    train(["--model_name_or_path", LLM_ID, "--vision_tower", CLIP_ID, "--pretrain_mm_mlp_adapter", PROJECTOR_ID,
           "--mm_projector_type", "mlp2x_gelu", "--tune_mm_mlp_adapter", "True", *data_args,
           "--output_dir", str(stage1), "--learning_rate", "0", "--max_steps", "1", *TRAIN_ARGS])  # fmt: skip
    expected = torch.load(hub.sources[PROJECTOR_ID] / "mm_projector.bin", weights_only=True)
    got = load_file(str(stage1 / "mm_projector.safetensors"))
    assert set(got) == set(expected) and all(torch.equal(got[k], v) for k, v in expected.items())


def _visionzip_ft(hub: TinyHub, repo_id: str, out: Path, budget: int) -> Path:
    """A projector-only VisionZip‡ output of ``repo_id`` (as training writes it: config.json with the budget)."""
    write_projector_only(out, hub.sources[repo_id], seed=2)
    config = json.loads((out / "config.json").read_text())
    config["mm_vision_tower"] = CLIP_ID
    config["visionzip"], config["visionzip_budget"] = VisionZipConfig.from_budget(budget).to_dict(), "per_crop"
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(("table", "row_id", "repo_id"), [("1", "visionzip-ft-64", V15_ID),
                                                          ("2", "visionzip-ft-320", V16_ID)])  # fmt: skip
def test_table_visionzip_ft_rows_load(hub: TinyHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str,
                                      row_id: str, repo_id: str) -> None:  # fmt: skip
    """The rows' model_args, parsed as lmms-eval parses them, load a projector-only output on the row's base."""
    spec = load_spec(resolve_spec_path(table))
    row = next(r for r in spec.rows if r.id == row_id)
    budget = int(row.model_args["budget"])
    out = _visionzip_ft(hub, repo_id, tmp_path / "ft", budget)
    monkeypatch.setenv(row.pretrained.strip("${}"), str(out))
    kwargs = simple_parse_args_string(grid.model_args_string(spec, row, {}))
    assert kwargs["model_base"] == repo_id
    runner = LlavaRunner.load(ModelOptions.from_kwargs(**kwargs), "cpu")
    projector = torch.load(out / "mm_projector.bin", weights_only=True)
    state = runner.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in projector.items())  # the fine-tuned projector, not the base's
    image = Image.open(SAMPLE).convert("RGB")
    pixels, sizes = inference.prepare_images([image], runner.image_processor, runner.model)
    views = pixels[0].shape[0] if isinstance(pixels, list) else pixels.shape[1] if pixels.dim() == 5 else 1
    with torch.no_grad():
        tokens = runner.model.image_features(pixels, sizes)[0].shape[0]
    assert tokens == views * budget  # the row's budget on every view (per crop)


def test_a_fresh_process_reads_the_environment_and_loads_quietly(hub: TinyHub) -> None:
    """What a user runs: only HF_HOME and HF_HUB_OFFLINE set, a new interpreter, both LLaVA ids loaded.

    Also nothing of the load noise: transformers' "layers were not sharded" list, the torchvision fallback of
    CLIPImageProcessor, the per-key load report.
    """
    script = (
        "import json\nfrom llava.model.builder import load_pretrained_model\n"
        f"for repo in {[V15_ID, V16_ID]!r}:\n"
        "    _, model, _, _ = load_pretrained_model(repo, device='cpu')\n"
        "    print(json.dumps([repo, model.get_vision_tower().tower_name, model.config._name_or_path]))\n"
    )
    env = {**os.environ, "HF_HOME": str(hub.hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("[")]
    assert [row[:2] for row in loaded] == [[V15_ID, CLIP_ID], [V16_ID, CLIP_ID]]
    assert all(Path(row[2]).is_relative_to(hub.hf_home / "hub") for row in loaded)
    for noise in ("were not sharded", "requires torchvision", "LOAD REPORT"):
        assert noise not in done.stderr, f"{noise!r} in:\n{done.stderr[-3000:]}"
