"""The vLLM plugin (``llava.serve.vllm``) against transformers' VisionZip classes and vLLM's stock LLaVA classes.

Runs in the serve venv (``bash scripts/setup_serve.sh``; ``.ci/run`` runs this file there) and skips where vLLM is
not installed (the main venv). Tiny random checkpoints (CLIP 64 px / patch 8: 64 patches + [CLS], 4 layers; Llama
2 layers, head dim 32: ``llava.tiny --servable``, what vLLM's CPU attention runs) are written by ``llava.tiny`` and
exported by ``llava.convert`` with the budget in config.json, as users export. One engine per checkpoint and class,
in-process, fp32, greedy; one server started by ``scripts/serve/vllm.sh``.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv: bash scripts/setup_serve.sh")

from safetensors.torch import load_file, save_file
from vllm import LLM, SamplingParams
from vllm.distributed import cleanup_dist_env_and_memory

from llava.model.hf_export import export_to_hf
from llava.serve.vllm import hf_overrides, saved_dtype
from llava.tiny import SERVABLE_HEAD_DIM, TinyConfig, write_tiny_llava
from visionzip import VisionZipConfig
from visionzip.hf.llava import VisionZipLlavaForConditionalGeneration, VisionZipLlavaProcessor
from visionzip.hf.llava_next import (
    VisionZipLlavaNextForConditionalGeneration,
    VisionZipLlavaNextProcessor,
)

TINY = TinyConfig().servable()  # head dim 32: the smallest vLLM's CPU attention backend takes (not the default 16)
REPO = Path(__file__).resolve().parents[1]
BUDGET = VisionZipConfig(6, 2)  # of 65 tokens per view
PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
SIZES = [(97, 50), (40, 121), (200, 90), (64, 64)]  # (width, height): NeXT grids 1x2, 2x1 or 3x1, ..., 1x1
NEW_TOKENS = 6
HF = {
    "v15": (VisionZipLlavaForConditionalGeneration, VisionZipLlavaProcessor),
    "next": (VisionZipLlavaNextForConditionalGeneration, VisionZipLlavaNextProcessor),
}


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


IMAGES = [_image(w, h, seed) for seed, (w, h) in enumerate(SIZES)]


def _hub_layout(src: Path, out: Path) -> Path:
    """A copy of an export with the tower's weights under ``vision_tower.vision_model.*`` (the hub's llava-hf
    layout, which vLLM's stock classes load; transformers 5 saves them without ``vision_model.``)."""
    shutil.copytree(src, out)
    tensors = load_file(out / "model.safetensors")
    renamed = {
        (k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k): v
        for k, v in tensors.items()
    }
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exports: ``v15``/``next`` without a budget, ``*-vz`` with ``BUDGET``, ``*-hub`` in the hub's tower layout."""
    root = tmp_path_factory.mktemp("serve_vllm")
    out: dict[str, Path] = {}
    for name, is_next in (("v15", False), ("next", True)):
        src = write_tiny_llava(root / "src", next=is_next, cfg=TINY)
        out[name] = export_to_hf(src, root / name)
        config = json.loads((src / "config.json").read_text())
        vz_src = shutil.copytree(src, root / f"src-{name}-vz")
        (vz_src / "config.json").write_text(json.dumps({**config, "visionzip": BUDGET.to_dict()}))
        out[f"{name}-vz"] = export_to_hf(vz_src, root / f"{name}-vz")
        out[f"{name}-hub"] = _hub_layout(out[name], root / f"{name}-hub")
    return out


@pytest.fixture(scope="module", autouse=True)
def _engine_env() -> Iterator[None]:
    """vLLM on CPU: a 1 GiB KV cache, the engine core in this process (one startup is ~40 s, not ~60 s)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield


def _engine(path: Path, **overrides: Any) -> LLM:
    return LLM(
        model=str(path), enforce_eager=True, dtype="float32", max_model_len=1024, seed=0,
        limit_mm_per_prompt={"image": 1}, **overrides,
    )  # fmt: skip


def _generate(path: Path, **overrides: Any) -> list[Any]:
    """One engine, every image in one ``generate`` (batched in the engine), then the engine is shut down."""
    llm = _engine(path, **overrides)
    try:
        requests = [{"prompt": PROMPT, "multi_modal_data": {"image": image}} for image in IMAGES]
        return llm.generate(requests, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def _reference(family: str, path: Path) -> tuple[list[list[int]], list[int]]:
    """transformers' VisionZip class on each image alone: greedy new ids and the image features' count."""
    model_cls, processor_cls = HF[family]
    model = model_cls.from_pretrained(path).eval()
    processor = processor_cls.from_pretrained(path, visionzip=model.visionzip_config)
    ids, counts = [], []
    for image in IMAGES:
        inputs = processor(images=image, text=PROMPT, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
            features = model.model.get_image_features(inputs["pixel_values"], **extra).pooler_output
        ids.append(out[0, inputs["input_ids"].shape[1] :].tolist())
        counts.append(features[0].shape[0])
    return ids, counts


@pytest.mark.slow
@pytest.mark.parametrize("family", ["v15", "next"])
def test_visionzip_equals_transformers(family: str, checkpoints: dict[str, Path]) -> None:
    """Greedy ids of the plugin (several requests in one engine batch) equal transformers' VisionZip class's, and
    each prompt's image tokens number what the model's features do (8 for 1.5, V * 8 for NeXT)."""
    path = checkpoints[f"{family}-vz"]
    config = json.loads((path / "config.json").read_text())
    overrides = hf_overrides(path)
    assert overrides == {"architectures": [f"VisionZip{config['architectures'][0]}"]}
    outputs = _generate(path, hf_overrides=overrides)
    expected_ids, expected_counts = _reference(family, path)
    counts = [out.prompt_token_ids.count(config["image_token_index"]) for out in outputs]
    assert counts == expected_counts
    if family == "v15":
        assert set(counts) == {BUDGET.tokens}
    else:  # V * (dominant + contextual), V = 1 + the crops of each image's grid: the images' grids differ
        assert all(count % BUDGET.tokens == 0 for count in counts) and len(set(counts)) > 1
    assert [list(out.outputs[0].token_ids) for out in outputs] == expected_ids


@pytest.mark.slow
@pytest.mark.parametrize("family", ["v15", "next"])
def test_off_equals_stock_vllm(family: str, checkpoints: dict[str, Path]) -> None:
    """Without a budget the VisionZip class is vLLM's stock class (on the hub's weight layout): same prompt ids, same
    greedy ids."""
    ours = _generate(checkpoints[family], hf_overrides=hf_overrides(checkpoints[family]))
    stock = _generate(checkpoints[f"{family}-hub"])
    assert [o.prompt_token_ids for o in ours] == [o.prompt_token_ids for o in stock]
    assert [list(o.outputs[0].token_ids) for o in ours] == [list(o.outputs[0].token_ids) for o in stock]


def test_processing_info_counts(checkpoints: dict[str, Path]) -> None:
    """vLLM's processing info counts the budget per image (1.5) and per AnyRes view (NeXT), the memory profile's
    maximum included: NeXT's largest grid among the config's pinpoints, in views of the tower's image size."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every engine process does first: our entry point registers the classes
    for family in ("v15", "next"):
        path = checkpoints[f"{family}-vz"]
        config = json.loads((path / "config.json").read_text())
        info = MULTIMODAL_REGISTRY.get_processing_info(ModelConfig(model=str(path), hf_overrides=hf_overrides(path)))
        side = config["vision_config"]["image_size"]
        views = [1 + (h // side) * (w // side) for h, w in config.get("image_grid_pinpoints", [[side, side]])]
        assert info.get_max_image_tokens() == (max(views) if family == "next" else 1) * BUDGET.tokens
        if family == "v15":
            assert info.get_num_image_tokens(image_width=3 * side, image_height=side) == BUDGET.tokens


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (VisionZipConfig(60, 10), "contextual=10 is larger than the 5 tokens left"),
        (VisionZipConfig(6, 2, layer=-1), "differs from vision_feature_layer=-2"),
    ],
)
def test_bad_budget_fails_at_startup(budget: VisionZipConfig, message: str, checkpoints: dict[str, Path]) -> None:
    """A budget the tower cannot give stops the engine while it starts, with the reason."""
    source = checkpoints["v15-vz"]
    path = shutil.copytree(source, source.parent / f"bad-{budget.dominant}-{budget.layer}")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "visionzip": budget.to_dict()}))
    with pytest.raises(ValueError, match=message):
        _generate(path, hf_overrides=hf_overrides(path))


def test_servable_head_dim_is_the_cpu_backends() -> None:
    """The head width ``llava.tiny --servable`` writes is one vLLM's CPU attention backend lists; the default's 16
    is not (the reason the default tiny model cannot be served on a CPU)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert CPUAttentionBackend.supports_head_size(SERVABLE_HEAD_DIM)
    assert not CPUAttentionBackend.supports_head_size(TinyConfig().head_dim)


def test_unservable_model_fails_at_startup(tmp_path: Path) -> None:
    """A model the attention backend cannot run (the default tiny Llama, heads 16 wide, on the CPU backend) stops the
    engine while it starts, naming the backend, the layer's head size and the sizes it takes (vLLM itself fails only
    on the first request, after the server reported ready)."""
    path = export_to_hf(write_tiny_llava(tmp_path / "src", cfg=TinyConfig()), tmp_path / "head16")
    with pytest.raises(ValueError, match=r"CPU_ATTN attention backend cannot run .*head size 16, expected one of \[32"):
        _generate(path, hf_overrides=hf_overrides(path))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(server: subprocess.Popen, url: str, log: Path, timeout_s: float = 900) -> None:
    """Poll ``url`` until the server answers; fail with the log's tail if it exits or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited ({server.returncode}) while starting:\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(2)
    raise AssertionError(f"the server did not answer {url} in {timeout_s} s:\n{log.read_text()[-4000:]}")


def _chat(base: str, model: str, messages: list[dict]) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}
    request = urllib.request.Request(
        f"{base}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.slow
def test_serve_script(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """``scripts/serve/vllm.sh`` with only MODEL set serves on 127.0.0.1 with the model's own length limit (2048) in
    the dtype it was exported in (float32), logs no ERROR line while starting and serving (the exported chat template
    passes vLLM's analyser),
    and a chat request with an image gets the prompt transformers' processor builds from the same messages."""
    path, port = checkpoints["v15-vz"], _free_port()
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "MAX_MODEL_LEN", "DTYPE", "NAME")}
    env.update(MODEL=str(path), PORT=str(port), VENV=sys.prefix, VLLM_CPU_KVCACHE_SPACE="1")
    with log.open("w") as out:
        server = subprocess.Popen(["bash", "scripts/serve/vllm.sh"], cwd=REPO, env=env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(server, f"{base}/v1/models", log)
        text = "What is in the image?"
        content = [{"type": "image_url", "image_url": {"url": _data_url(IMAGES[0])}}, {"type": "text", "text": text}]
        reply = _chat(base, path.name, [{"role": "user", "content": content}])
        logged = log.read_text()  # startup and the request; stopping the engine with SIGTERM logs errors of its own
    finally:
        server.terminate()
        server.wait(timeout=120)
    processor = VisionZipLlavaProcessor.from_pretrained(path, visionzip=BUDGET)
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(hf_messages, add_generation_prompt=True)
    ids = processor(images=IMAGES[0], text=prompt)["input_ids"][0]
    assert ids[0] == processor.tokenizer.bos_token_id
    # vLLM's chat endpoint tokenizes the rendered template without special tokens, and the exported template writes
    # no <s>: the served prompt is the processor's without its BOS (our own runner's prompts start with <s>)
    assert (reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"]) == (len(ids) - 1, NEW_TOKENS)
    assert f"Starting vLLM server on http://127.0.0.1:{port}" in logged
    assert "dtype=torch.float32, max_seq_len=2048," in logged
    errors = [line for line in logged.splitlines() if " ERROR " in line]
    assert not errors, "\n".join(errors[:20])


def test_saved_dtype(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The serve script's default dtype is the export's (float32 here), from ``dtype`` or transformers 4's
    ``torch_dtype``, and vLLM's ``auto`` when config.json names none."""
    assert saved_dtype(checkpoints["v15"]) == "float32"
    for keys, expected in (({"torch_dtype": "bfloat16"}, "bfloat16"), ({}, "auto")):
        (tmp_path / "config.json").write_text(json.dumps(keys))
        assert saved_dtype(tmp_path) == expected
