"""Tests for llava.tiny: tiny random LLaVA checkpoints in the released on-disk layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

from llava.tiny import (
    SERVABLE_HEAD_DIM,
    SYSTEM_PROMPT,
    TinyConfig,
    build_tokenizer,
    main,
    write_projector_only,
    write_tiny_llava,
)

SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "llava" / "serve" / "examples" / "chelsea.jpg"
TOWER = "model.vision_tower.vision_tower.vision_model."
VERSIONS = {False: "llava-v1.5-tiny", True: "llava-v1.6-tiny"}
TEXTS = [
    SYSTEM_PROMPT,
    "USER: <image>\nWhat is in the image? ASSISTANT:",
    "  leading and  double  spaces, trailing ",
    "Colours: red, GREEN, Blue! Shapes: a circle (0), a square [1], a triangle {2}.",
    "Words never seen in training: xylophone, quokka, Zürich, 東京, 🐱",
    "\ttab\nnew line\r\n",
]


def _load_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Read every weight of a checkpoint folder, whichever of the four released layouts it uses."""
    if (ckpt_dir / "model.safetensors").is_file():
        return load_file(ckpt_dir / "model.safetensors")
    for index_name, load in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", lambda path: torch.load(path, weights_only=True)),
    ):
        if (ckpt_dir / index_name).is_file():
            index = json.loads((ckpt_dir / index_name).read_text())
            weights: dict[str, torch.Tensor] = {}
            for name in sorted(set(index["weight_map"].values())):
                shard = load(ckpt_dir / name)
                assert all(index["weight_map"][key] == name for key in shard)
                weights.update(shard)
            assert set(weights) == set(index["weight_map"])
            assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
            return weights
    raise AssertionError(f"no weights in {ckpt_dir}")


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One folder per format, each holding v1.5 and then v1.6 (which reuses v1.5's clip/)."""
    out = {}
    for fmt in ("safetensors", "bin"):
        out[fmt] = tmp_path_factory.mktemp(fmt)
        for next_ in (False, True):
            path = write_tiny_llava(out[fmt], next=next_, fmt=fmt, seed=0)
            assert path == out[fmt] / VERSIONS[next_]
    return out


CASES = [(fmt, next_) for fmt in ("safetensors", "bin") for next_ in (False, True)]


def test_tokenizer_round_trip_and_reload(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(tmp_path)
    assert abs(len(tokenizer) - 1000) <= 50
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    special = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert special == (0, 1, 2, 0)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert (reloaded.pad_token, reloaded.padding_side, reloaded.model_max_length) == ("<unk>", "right", 2048)
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.unk_token) == ("<s>", "</s>", "<unk>")
    for text in TEXTS:
        ids = reloaded(text).input_ids
        assert ids == tokenizer(text).input_ids
        assert ids[0] == 1 and ids.count(1) == 1, "BOS must be prepended exactly once"
        assert 0 not in ids, "byte-level BPE must never need <unk>"
        assert reloaded.decode(ids, skip_special_tokens=True) == text
        assert reloaded(text, add_special_tokens=False).input_ids == ids[1:]
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["pad_token"] == "<unk>"


@pytest.mark.parametrize(("fmt", "next_"), CASES)
def test_checkpoint_files(roots: dict[str, Path], fmt: str, next_: bool) -> None:
    ckpt = roots[fmt] / VERSIONS[next_]
    expected = {"config.json", "generation_config.json"}
    expected |= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    if fmt == "safetensors":
        expected |= {"model.safetensors"}
    else:
        expected |= {f"pytorch_model-0000{i}-of-00002.bin" for i in (1, 2)} | {"pytorch_model.bin.index.json"}
    assert {p.name for p in ckpt.iterdir()} == expected
    clip_files = {p.name for p in (roots[fmt] / "clip").iterdir()}
    assert clip_files == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    generation = json.loads((ckpt / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    assert AutoTokenizer.from_pretrained(ckpt)("a cat").input_ids[0] == 1


@pytest.mark.parametrize(("fmt", "next_"), CASES)
def test_config_json(roots: dict[str, Path], fmt: str, next_: bool) -> None:
    config = json.loads((roots[fmt] / VERSIONS[next_] / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(roots[fmt] / VERSIONS[next_])
    common = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 128,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
        "mm_hidden_size": 64,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 2048,
        "use_mm_proj": True,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
    }
    v15 = {"model_type": "llava", "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat"}
    v16 = {
        "model_type": "llava_llama",
        "image_aspect_ratio": "anyres",
        "mm_patch_merge_type": "spatial_unpad",
        "image_grid_pinpoints": [[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]],
        "unfreeze_mm_vision_tower": True,
    }
    for key, value in {**common, **(v16 if next_ else v15)}.items():
        assert config[key] == value, key
    tower = Path(config["mm_vision_tower"])
    assert tower.is_absolute() and tower == (roots[fmt] / "clip").resolve()
    llama = LlamaConfig(**config)  # the legacy keys (torch_dtype, rope_theta) still read in transformers 5
    assert (llama.hidden_size, llama.head_dim, llama.rope_parameters["rope_theta"]) == (64, 16, 10000.0)


def _llama_for(config_path: Path) -> dict[str, torch.Size]:
    """Shapes of a freshly built LlamaForCausalLM's state dict for the checkpoint's config (on the meta device)."""
    from transformers import LlamaForCausalLM

    config = json.loads(config_path.read_text())
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    return {key: value.shape for key, value in model.state_dict().items()}


@pytest.mark.parametrize(("fmt", "next_"), CASES)
def test_weight_names(roots: dict[str, Path], fmt: str, next_: bool) -> None:
    ckpt = roots[fmt] / VERSIONS[next_]
    weights = _load_weights(ckpt)
    literal = {
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.mm_projector.0.weight",
        "model.mm_projector.0.bias",
        "model.mm_projector.2.weight",
        "model.mm_projector.2.bias",
    }
    assert literal <= set(weights)
    llama = _llama_for(ckpt / "config.json")
    for key, shape in llama.items():
        assert weights[key].shape == shape, key
    assert weights["model.mm_projector.0.weight"].shape == (64, 64)
    assert weights["model.mm_projector.2.bias"].shape == (64,)
    projector = {k for k in weights if k.startswith("model.mm_projector.")}
    assert len(projector) == 4
    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)}
    assert (inv_freq <= set(weights)) == (fmt == "bin")
    assert not any("inv_freq" in k for k in weights) or fmt == "bin"
    tower = {k for k in weights if k.startswith("model.vision_tower.")}
    extra = set(weights) - set(llama) - projector - inv_freq - tower - {"model.image_newline"}
    assert not extra
    assert all(t.dtype == torch.float32 for t in weights.values())
    if not next_:
        assert not tower and "model.image_newline" not in weights
        return
    assert weights["model.image_newline"].shape == (64,)
    for name in (
        "embeddings.patch_embedding.weight",
        "embeddings.class_embedding",
        "embeddings.position_embedding.weight",
        "pre_layrnorm.weight",
        "pre_layrnorm.bias",
        "encoder.layers.3.self_attn.out_proj.bias",
        "encoder.layers.0.self_attn.k_proj.weight",
        "encoder.layers.0.layer_norm1.weight",
        "encoder.layers.2.layer_norm2.bias",
        "encoder.layers.1.mlp.fc1.weight",
        "encoder.layers.1.mlp.fc2.bias",
        "post_layernorm.weight",
    ):
        assert TOWER + name in weights, name
    vision = json.loads((roots[fmt] / "clip" / "config.json").read_text())["vision_config"]
    with torch.device("meta"):
        reference = CLIPVisionModel(CLIPVisionConfig(**vision)).state_dict()
    assert {k.removeprefix(TOWER) for k in tower} == set(reference)
    assert weights[TOWER + "embeddings.position_embedding.weight"].shape == (8 * 8 + 1, 64)


def test_tuned_tower_differs_from_clip(roots: dict[str, Path]) -> None:
    weights = _load_weights(roots["safetensors"] / "llava-v1.6-tiny")
    clip = load_file(roots["safetensors"] / "clip" / "model.safetensors")
    for key, value in clip.items():
        if key.startswith("vision_model."):
            tuned = weights["model.vision_tower.vision_tower." + key]
            assert tuned.shape == value.shape
            assert not torch.equal(tuned, value), key
            assert (tuned - value).abs().max() < 0.1, key
    # both formats draw the same values for the same seed
    binary = _load_weights(roots["bin"] / "llava-v1.6-tiny")
    assert all(torch.equal(binary[key], value) for key, value in weights.items())


def test_clip_dir_loads_and_preprocesses(roots: dict[str, Path]) -> None:
    clip_dir = roots["safetensors"] / "clip"
    tower = CLIPVisionModel.from_pretrained(clip_dir)
    stored = load_file(clip_dir / "model.safetensors")
    for key, value in tower.state_dict().items():
        assert torch.equal(value, stored["vision_model." + key]), key
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    pixels = processor(images=Image.open(SAMPLE_IMAGE), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == 4 + 1 and hidden[-2].shape == (1, 8 * 8 + 1, 64)


def test_projector_only(roots: dict[str, Path], tmp_path: Path) -> None:
    base = roots["bin"] / "llava-v1.5-tiny"
    out = write_projector_only(tmp_path / "pretrain", base, seed=0)
    projector = torch.load(out / "mm_projector.bin", weights_only=True)
    names = ("0.weight", "0.bias", "2.weight", "2.bias")
    assert set(projector) == {f"model.mm_projector.{name}" for name in names}
    base_weights = _load_weights(base)
    for key, value in projector.items():
        assert value.shape == base_weights[key].shape
        assert not torch.equal(value, base_weights[key]), key
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((base / "config.json").read_text())
    assert config.pop("tune_mm_mlp_adapter") is True
    base_config.pop("tune_mm_mlp_adapter")
    assert config == base_config


def test_cli_is_deterministic_and_shards(roots: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["--out", str(tmp_path), "--seed", "0", "--shard-size", "150000"])
    ckpt = Path(capsys.readouterr().out.strip())
    assert ckpt == tmp_path / "llava-v1.5-tiny"
    assert (ckpt / "model.safetensors.index.json").is_file() and not (ckpt / "model.safetensors").exists()
    shards = sorted(p.name for p in ckpt.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    sharded, reference = _load_weights(ckpt), _load_weights(roots["safetensors"] / "llava-v1.5-tiny")
    assert set(sharded) == set(reference)
    assert all(torch.equal(sharded[key], value) for key, value in reference.items())
    other = _load_weights(write_tiny_llava(tmp_path / "seed1", seed=1))
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.mm_projector.0.weight", "lm_head.weight"):
        assert not torch.equal(other[key], reference[key]), key


def test_cli_servable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--servable``: the language model's heads are 32 wide (vLLM's CPU backend takes 32, not 16), same width."""
    main(["--out", str(tmp_path), "--servable"])
    config = json.loads((Path(capsys.readouterr().out.strip()) / "config.json").read_text())
    llama = LlamaConfig(**config)
    assert (llama.hidden_size, llama.num_attention_heads, llama.num_key_value_heads) == (64, 2, 2)
    assert llama.head_dim == SERVABLE_HEAD_DIM == 32
    assert TinyConfig(num_kv_heads=2).servable().num_kv_heads == 1  # grouped-query sharing kept (4:2 -> 2:1)
    with pytest.raises(ValueError, match="hidden_size % 32"):
        TinyConfig(hidden_size=48, num_heads=4, num_kv_heads=4).servable()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="image_size % patch_size"):
        TinyConfig(image_size=60)
    with pytest.raises(ValueError, match="select_layer"):
        TinyConfig(select_layer=-5)
    assert TinyConfig(image_size=32).grid_pinpoints[0] == [32, 64]


def test_sample_image() -> None:
    assert SAMPLE_IMAGE.stat().st_size < 40_000
    with Image.open(SAMPLE_IMAGE) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        assert max(image.size) <= 256
    assert "CC0" in (SAMPLE_IMAGE.parent / "README.md").read_text()
