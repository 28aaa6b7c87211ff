"""``python -m llava.convert --to-hf``: our tiny checkpoints exported to transformers' LLaVA classes run as ours do."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers.utils.chat_template_utils import render_jinja_template

from llava import convert
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model import hf_export, hf_processor
from llava.model.builder import load_pretrained_model, read_config
from llava.tiny import write_projector_only
from visionzip import VisionZipConfig

QUESTION = "What is in the image?"
SIZES = {"v15": [(97, 50), (40, 121)], "v16": [(97, 50), (40, 121), (200, 90)]}  # (width, height), non-square
HF_CLASSES = {"v15": LlavaForConditionalGeneration, "v16": LlavaNextForConditionalGeneration}
BUDGET = VisionZipConfig(6, 2)  # of 65 tokens per view in the tiny tower
ATOL = 1e-5


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _prompt(template: str = "vicuna_v1") -> str:
    conv = get_conv_template(template)
    conv.append_message(conv.roles[0], f"<image>\n{QUESTION}")
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.fixture(scope="module")
def sources(
    tiny_pair: dict[str, Path], sp_llava15: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:  # fmt: skip
    """The checkpoints exported: LLaVA-1.5 (BPE tokenizer), LLaVA-1.6 AnyRes, LLaVA-1.5 with the released
    sentencepiece tokenizer (legacy false), and LLaVA-1.6 with resolutions that are not a symmetric set (so that
    a (width, height) read as (height, width) picks other crops)."""
    asym = shutil.copytree(tiny_pair["v16"], tmp_path_factory.mktemp("asym") / "llava-v1.6-asym")
    config = json.loads((asym / "config.json").read_text())
    side = json.loads((Path(config["mm_vision_tower"]) / "config.json").read_text())["vision_config"]["image_size"]
    config["image_grid_pinpoints"] = [[2 * side, side], [side, 3 * side], [2 * side, 2 * side]]  # (width, height)
    (asym / "config.json").write_text(json.dumps(config))
    return {"v15": tiny_pair["v15"], "v16": tiny_pair["v16"], "v15-sp": sp_llava15, "v16-asym": asym}


@pytest.fixture(scope="module")
def exported(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each source exported once, v1.5 through the command line."""
    root = tmp_path_factory.mktemp("exported")
    out = {name: root / name for name in sources}
    convert.main(["--to-hf", str(sources["v15"]), str(out["v15"])])
    for name in ("v16", "v15-sp", "v16-asym"):
        hf_export.export_to_hf(sources[name], out[name])
    return out


def _ours(model: Any, tokenizer: Any, image_processor: Any, image: Image.Image, prompt: str) -> tuple:
    """Our pipeline: (input ids (1, L) with -200, pixels, logits (1, L', V), image token count)."""
    ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]
    pixels = process_images([image], image_processor, model.config)
    with torch.no_grad():
        count = model.image_features(pixels, [image.size])[0].shape[0]
        logits = model(ids, images=pixels, image_sizes=[image.size]).logits
    return ids, pixels, logits, count


def _expanded(ids: torch.Tensor, image_token_id: int, count: int) -> torch.Tensor:
    """(1, L) ids with our placeholder -> (1, L - 1 + count) with ``count`` transformers image tokens."""
    row = []
    for token in ids[0].tolist():
        row.extend([image_token_id] * count if token == IMAGE_TOKEN_INDEX else [token])
    return torch.tensor([row])


@pytest.mark.parametrize("name", ["v15", "v16", "v15-sp", "v16-asym"])
def test_exported_logits_equal_ours(name: str, sources: dict[str, Path], exported: dict[str, Path]) -> None:
    """Same image and prompt: ours, the transformers class fed our pixels and ids, and the transformers class fed
    its processor's output give the same logits (fp32, 1e-5); the processor's ids and pixels are ours."""
    family = name.split("-")[0]
    tokenizer, model, image_processor, _ = load_pretrained_model(str(sources[name]), device="cpu", device_map=None)
    hf = HF_CLASSES[family].from_pretrained(exported[name]).eval()
    processor = AutoProcessor.from_pretrained(exported[name])
    image_token_id = hf.config.image_token_id
    prompt = _prompt()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == prompt
    for width, height in SIZES[family]:
        image = _image(width, height)
        ids, pixels, ours, count = _ours(model, tokenizer, image_processor, image, prompt)
        vocab = ours.shape[-1]
        extra = {} if family == "v15" else {"image_sizes": torch.tensor([[height, width]])}
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            direct = hf(input_ids=_expanded(ids, image_token_id, count), pixel_values=pixels, **extra).logits
            via_processor = hf(**inputs).logits
        assert direct.shape[-1] == vocab + 1  # the added <image> token's column
        torch.testing.assert_close(direct[..., :vocab], ours, atol=ATOL, rtol=0)
        assert hf_processor._collapsed(inputs["input_ids"][0].tolist(), image_token_id) == ids[0].tolist()
        torch.testing.assert_close(inputs["pixel_values"], pixels, atol=ATOL, rtol=0)  # (1, [V,] 3, S, S)
        torch.testing.assert_close(via_processor[..., :vocab], ours, atol=ATOL, rtol=0)
    with torch.no_grad():  # greedy decoding: the same new tokens (the <image> token is never chosen)
        mine = model.generate(ids, images=pixels, image_sizes=[image.size], max_new_tokens=4, do_sample=False)
        theirs = hf.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    assert theirs.tolist() == mine.tolist()


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "mistral_instruct", "llava_llama_2", "chatml_direct"])
def test_chat_template_renders_our_conversation(template: str) -> None:
    """The Jinja template gives ``Conversation.get_prompt()`` for the same turns, with a generation prompt, and with
    a system message that replaces the template's."""
    turns = [f"<image>\n{QUESTION}", "A cat.", "And its colour?"]
    conv = get_conv_template(template)
    messages = []
    for i, text in enumerate(turns):
        conv.append_message(conv.roles[i % 2], text)
        role = "user" if i % 2 == 0 else "assistant"
        content = [{"type": "image"}, {"type": "text", "text": QUESTION}] if i == 0 else text
        messages.append({"role": role, "content": content})
    conv.append_message(conv.roles[1], None)
    jinja = hf_processor.chat_template(get_conv_template(template))
    assert render_jinja_template([messages], chat_template=jinja, add_generation_prompt=True)[0][0] == conv.get_prompt()
    conv.system = "Be brief."
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    rendered = render_jinja_template([with_system], chat_template=jinja, add_generation_prompt=True)[0][0]
    assert rendered == conv.get_prompt()


def _with_budget(src: Path, out: Path, base: Path | None) -> Path:
    """``src``'s config with a saved VisionZip budget, as VisionZip‡ training writes it; a projector-only output
    (``write_projector_only``) when ``base`` is given, else a copy of the full checkpoint."""
    if base is not None:
        write_projector_only(out, base, seed=2)
    else:
        shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config.update(visionzip=BUDGET.to_dict(), visionzip_budget="per_crop")
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("family", ["v15", "v16"])
def test_visionzip_checkpoint_exports_projector_and_budget(
    family: str, tiny_pair: dict[str, Path], tmp_path: Path
) -> None:  # fmt: skip
    """A VisionZip‡ projector on its base (v1.5) and a full checkpoint saving a budget (v1.6): config.json holds the
    budget, the weights the fine-tuned projector; transformers' class equals ours with VisionZip off and, where the
    VisionZip subclasses are importable, theirs equals ours with it on."""
    base = tiny_pair[family]
    src = _with_budget(base, tmp_path / "ft", base if family == "v15" else None)
    out = hf_export.export_to_hf(src, tmp_path / "hf", model_base=str(base) if family == "v15" else None)
    assert json.loads((out / "config.json").read_text())["visionzip"] == BUDGET.to_dict()
    hf = HF_CLASSES[family].from_pretrained(out).eval()
    if family == "v15":
        projector = torch.load(src / "mm_projector.bin", weights_only=True)
        state = hf.state_dict()
        for i, layer in (("0", "linear_1"), ("2", "linear_2")):
            for kind in ("weight", "bias"):
                expected = projector[f"model.mm_projector.{i}.{kind}"]
                assert torch.equal(state[f"model.multi_modal_projector.{layer}.{kind}"], expected)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        str(src), str(base) if family == "v15" else None, device="cpu", device_map=None
    )
    assert model.config.visionzip_config() == BUDGET
    processor = AutoProcessor.from_pretrained(out)
    image, prompt = _image(97, 50), _prompt()
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    model.set_visionzip(None)
    _, _, ours_off, _ = _ours(model, tokenizer, image_processor, image, prompt)
    with torch.no_grad():
        torch.testing.assert_close(hf(**inputs).logits[..., : ours_off.shape[-1]], ours_off, atol=ATOL, rtol=0)
    _check_visionzip_subclass(family, out, model, tokenizer, image_processor, image, prompt)


def _check_visionzip_subclass(
    family: str, out: Path, model: Any, tokenizer: Any, image_processor: Any, image: Image.Image, prompt: str
) -> None:  # fmt: skip
    """The VisionZip subclass of transformers' class (``visionzip.hf``) reads the exported budget and gives
    our logits with VisionZip on; skipped where those adapters are not importable."""
    module = pytest.importorskip(f"visionzip.hf.{'llava' if family == 'v15' else 'llava_next'}")
    prefix = "VisionZipLlava" if family == "v15" else "VisionZipLlavaNext"
    hf = getattr(module, f"{prefix}ForConditionalGeneration").from_pretrained(out).eval()
    assert hf.visionzip_config == BUDGET
    processor = getattr(module, f"{prefix}Processor").from_pretrained(out, visionzip=hf.visionzip_config)
    model.set_visionzip(BUDGET)
    _, _, ours_on, _ = _ours(model, tokenizer, image_processor, image, prompt)
    with torch.no_grad():
        theirs = hf(**processor(images=image, text=prompt, return_tensors="pt")).logits
    torch.testing.assert_close(theirs[..., : ours_on.shape[-1]], ours_on, atol=ATOL, rtol=0)


def test_sources_it_cannot_convert_raise(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    """No weights, a projector without its base, a missing tensor, a used output folder: ValueError saying which
    (the command line exits with the message)."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_pair["v15"] / "config.json", bare / "config.json")
    with pytest.raises(ValueError, match="no LLaVA weights"):
        hf_export.export_to_hf(bare, tmp_path / "o1")
    projector = write_projector_only(tmp_path / "projector", tiny_pair["v15"], seed=1)
    with pytest.raises(ValueError, match="pass model_base"):
        hf_export.export_to_hf(projector, tmp_path / "o2")
    holed = shutil.copytree(tiny_pair["v15"], tmp_path / "holed")
    weights = load_file(holed / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, holed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: \[model\.norm\.weight\]"):
        hf_export.export_to_hf(holed, tmp_path / "o3")
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not empty"):
        hf_export.export_to_hf(tiny_pair["v15"], used)
    with pytest.raises(SystemExit):
        convert.main(["--to-hf", str(bare), str(tmp_path / "o4")])


def test_configs_and_weights_it_cannot_place_raise(tiny_pair: dict[str, Path]) -> None:
    """Settings transformers' classes do not have, and weights with no place there, are named in the error."""
    v15, v16 = read_config(tiny_pair["v15"]), read_config(tiny_pair["v16"])
    assert (hf_export.hf_family(v15), hf_export.hf_family(v16)) == ("llava", "llava_next")
    bad = {
        "mm_projector_type": ("linear", "mm_projector_type 'linear'"),
        "mm_use_im_start_end": (True, "mm_use_im_start_end"),
        "mm_patch_merge_type": ("spatial", "mm_patch_merge_type 'spatial'"),
        "image_aspect_ratio": ("anyres_max_9", "image_aspect_ratio 'anyres_max_9'"),
    }
    for key, (value, message) in bad.items():
        config = read_config(tiny_pair["v16"])
        setattr(config, key, value)
        with pytest.raises(ValueError, match=message):
            hf_export.hf_family(config)
    v16.visionzip, v16.visionzip_budget = BUDGET.to_dict(), "total"
    with pytest.raises(ValueError, match="per_crop"):
        hf_export.visionzip_entry(v16, "llava_next")
    v15.visionzip = VisionZipConfig(6, 2, positions="original").to_dict()
    with pytest.raises(ValueError, match="packed"):
        hf_export.visionzip_entry(v15, "llava")
    state = {"model.norm.weight": torch.zeros(2), "model.vision_resampler.w": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"model\.vision_resampler\.w"):
        hf_export.rename_state_dict(state)


def test_command_prints_only_the_export_folder(tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    """``python -m llava.convert`` in a fresh interpreter prints the export's folder and nothing else on stdout (no
    DeepSpeed accelerator probe, which transformers' save_pretrained imports through accelerate)."""
    out = tmp_path / "hf"
    done = subprocess.run(
        [sys.executable, "-m", "llava.convert", "--to-hf", str(tiny_pair["v15"]), str(out)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    assert done.stdout == f"{out}\n"
    assert "Setting accelerator" not in done.stderr
    assert (out / "config.json").is_file()
