"""load_pretrained_model: released LLaVA checkpoints (full, projector-only, LoRA), decided from the files."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from llava.model.config import LlavaConfig, LlavaMistralConfig
from llava.model.hub import local_checkpoint
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM
from llava.model.mini_gemini import MGM_MODEL_TYPE, MiniGeminiConfig, MiniGeminiLlamaForCausalLM
from llava.model.placement import resolve_placement
from llava.model.tokenizer import load_tokenizer
from llava.model.vision_tower import quiet_load_report
from llava.model.weights import named_weight_errors, read_weights_file
from visionzip import VisionZipConfig
from visionzip.baselines.select import SelectionConfig

logger = logging.getLogger(__name__)

CONFIG_CLASSES: dict[str, type[PreTrainedConfig]] = {
    "llava": LlavaConfig,  # LLaVA-1.5's released configs
    "llava_llama": LlavaConfig,
    "llava_mistral": LlavaMistralConfig,
    MGM_MODEL_TYPE: MiniGeminiConfig,  # Mini-Gemini (MGM)
}
MODEL_CLASSES: dict[type[PreTrainedConfig], type[PreTrainedModel]] = {
    LlavaConfig: LlavaLlamaForCausalLM,
    LlavaMistralConfig: LlavaMistralForCausalLM,
    MiniGeminiConfig: MiniGeminiLlamaForCausalLM,
}
# LLaVA-1.6 files hold the tuned tower in transformers 4.x naming, with a `vision_model.` level that 5.x dropped.
TOWER_KEY_MAPPING = {r"^model\.vision_tower\.vision_tower\.vision_model\.": "model.vision_tower.vision_tower."}
TOWER_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin")


def checkpoint_kind(model_path: str | Path) -> str:
    """``"lora"``, ``"projector"`` or ``"full"``, from the files in ``model_path`` (never from its name)."""
    path = Path(model_path)
    if (path / "adapter_config.json").is_file():
        return "lora"
    has_weights = any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS)
    if has_weights:
        return "full"
    if any((path / name).is_file() for name in ("mm_projector.safetensors", "mm_projector.bin")):
        return "projector"
    raise ValueError(
        f"no LLaVA weights in {path}: expected model*.safetensors / pytorch_model*.bin (full), mm_projector.bin "
        "(projector-only, with --model-base) or adapter_config.json (LoRA, with --model-base)"
    )


def read_config(model_path: str | Path) -> PreTrainedConfig:
    """Our config class for a released ``config.json`` (``model_type`` llava, llava_llama or llava_mistral)."""
    path = Path(model_path)
    data = json.loads((path / "config.json").read_text())
    if "text_config" in data:
        raise ValueError(
            f"{path} is a transformers-format LLaVA (llava-hf); this loader reads the original LLaVA format"
        )
    model_type = data.pop("model_type", None)
    if model_type not in CONFIG_CLASSES:
        if any("Mistral" in arch for arch in data.get("architectures") or []):
            model_type = "llava_mistral"
        else:
            raise ValueError(
                f"unsupported model_type {model_type!r} in {path}; expected one of {sorted(CONFIG_CLASSES)}"
            )
    for key in ("mm_vision_tower", "mm_vision_tower_aux"):  # the second: Mini-Gemini's ConvNeXt
        tower = data.get(key)
        if tower and not Path(tower).is_absolute() and (path / tower).is_dir():
            data[key] = str((path / tower).resolve())  # a tower shipped beside the checkpoint
    return CONFIG_CLASSES[model_type].from_dict(data)


def read_state_dict(path: Path, stem: str) -> dict[str, torch.Tensor]:
    """``stem.safetensors`` if present, else ``stem.bin`` loaded with ``weights_only=True``."""
    if (path / f"{stem}.safetensors").is_file():
        return read_weights_file(path / f"{stem}.safetensors")
    if (path / f"{stem}.bin").is_file():
        return read_weights_file(path / f"{stem}.bin")
    raise FileNotFoundError(f"neither {stem}.safetensors nor {stem}.bin in {path}")


def _listed(keys: list[str], limit: int = 20) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_loading_info(info: dict[str, Any], model: PreTrainedModel, allow_missing: tuple[str, ...]) -> bool:
    """Raise on missing or unexpected weights beyond the expected ones; return whether the tower was missing.

    The tower may be missing as a whole (LLaVA-1.5 files carry none; it loads from ``mm_vision_tower``),
    never in part; so may each of a model's other ``tower_prefixes`` (Mini-Gemini's ConvNeXt).
    """
    missing = set(info.get("missing_keys", ()))
    unexpected = [k for k in info.get("unexpected_keys", ()) if not k.endswith("rotary_emb.inv_freq")]
    prefixes = tuple(getattr(model, "tower_prefixes", (TOWER_PREFIX,)))
    towers = {k for k in model.state_dict() if k.startswith(prefixes)}
    for prefix in prefixes:
        tower_keys = {k for k in towers if k.startswith(prefix)}
        if missing & tower_keys and missing & tower_keys != tower_keys:
            parts = _listed(list(missing & tower_keys))
            raise ValueError(f"checkpoint has only part of the vision tower {prefix}*; missing: {parts}")
    tower_missing = {k for k in towers if k.startswith(TOWER_PREFIX)} & missing
    other = [k for k in missing - towers if not k.startswith(allow_missing)]
    if other or unexpected:
        raise ValueError(
            f"checkpoint does not match the model. missing: [{_listed(other)}]; unexpected: [{_listed(unexpected)}]"
        )
    return bool(tower_missing)


def load_projector(model: PreTrainedModel, path: Path) -> None:
    """Load ``mm_projector.{safetensors,bin}`` (keys ``model.mm_projector.*``) from a folder, strictly."""
    load_projector_state(model, read_state_dict(path, "mm_projector"), str(path))


def load_projector_state(model: PreTrainedModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a projector state dict (keys ``[...]mm_projector.*``) into the model; every key must match."""
    local = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    if len(local) != len(state):
        raise ValueError(f"mm_projector weights in {source} have non-projector keys: {_listed(list(set(state)))}")
    projector = model.get_model().mm_projector
    result = projector.load_state_dict(
        {k: v.to(projector.state_dict()[k].dtype) for k, v in local.items()}, strict=False
    )
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"mm_projector in {source} does not match the model: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )


def merge_lora(model: PreTrainedModel, path: Path) -> tuple[PreTrainedModel, set[str]]:
    """LLaVA's LoRA checkpoint: non-LoRA trainables (projector...) then the adapter merged with peft; returns the
    merged model and the keys the non-LoRA trainables set."""
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError("LoRA checkpoints need peft: pip install 'llava-visionzip[train]'") from err
    extra = read_state_dict(path, "non_lora_trainables")
    extra = {k.removeprefix("base_model.model."): v for k, v in extra.items()}  # peft's wrapper prefix
    result = model.load_state_dict(extra, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"non_lora_trainables has unknown keys: {_listed(result.unexpected_keys)}")
    return PeftModel.from_pretrained(model, str(path)).merge_and_unload(), set(extra)


def check_newline_loaded(info: dict[str, Any], provided: set[str], model_path: str, model_base: str | None) -> None:
    """ValueError when the model has an ``image_newline`` (``spatial_unpad``) that no file gave: from_pretrained
    leaves a missing parameter as uninitialised memory, which every AnyRes image would read (inf/nan or noise)."""
    key = "model.image_newline"
    if key in set(info.get("missing_keys", ())) and key not in provided:
        raise ValueError(
            f"{model_path} uses image_newline (mm_patch_merge_type spatial_unpad), but neither it nor model_base "
            f"{model_base} holds {key}: expected a LLaVA-NeXT base, or a checkpoint that saves it (LoRA jobs save it "
            "in non_lora_trainables)"
        )


def _load_kwargs(
    device: str, device_map: Any, dtype: torch.dtype | str | None, load_8bit: bool, load_4bit: bool
) -> dict:
    """``from_pretrained`` keyword arguments: placement (see :func:`llava.model.placement.resolve_placement`)."""
    kwargs = resolve_placement(device, device_map, dtype).load_kwargs()
    if load_8bit or load_4bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as err:
            raise ImportError("8/4-bit loading needs bitsandbytes: pip install 'llava-visionzip[quant]'") from err
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=load_8bit, load_in_4bit=load_4bit)
    return kwargs


def load_pretrained_model(
    model_path: str, model_base: str | None = None, model_name: str | None = None, load_8bit: bool = False,
    load_4bit: bool = False, device_map: Any = "auto", device: str = "cuda", attn_implementation: str | None = None,
    visionzip: VisionZipConfig | dict | None = None, visionzip_budget: str = "per_crop",
    dtype: torch.dtype | None = None, selection: SelectionConfig | dict | None = None,
) -> tuple[Any, PreTrainedModel, Any, int]:  # fmt: skip
    """Load a LLaVA checkpoint as LLaVA's builder does; returns ``(tokenizer, model, image_processor, context_len)``.

    ``model_name`` is accepted for compatibility and ignored: the kind of checkpoint is read from the files.
    ``visionzip`` sets the VisionZip stage (see ``LlavaMetaForCausalLM.set_visionzip``); None keeps the one saved in
    the checkpoint's config.json (a VisionZip‡ checkpoint's, or none). Entry points choose with :func:`use_visionzip`.
    ``selection`` sets DivPrune, VisPruner or CDPruner instead (``LlavaMetaForCausalLM.set_selection``; None keeps
    the checkpoint's ``token_selection``, if any).
    """
    del model_name
    path = Path(local_checkpoint(model_path))
    kind = checkpoint_kind(path)
    if kind != "full" and model_base is None:
        raise ValueError(f"{path} is a {kind} checkpoint: pass model_base (the LLM it was trained on)")
    if kind == "full" and model_base is not None:
        logger.info("%s is a full checkpoint: model_base %s is not needed, not loaded", model_path, model_base)
    model_base = local_checkpoint(model_base) if kind != "full" else None
    config = read_config(path)
    model_cls = MODEL_CLASSES[type(config)]
    kwargs = _load_kwargs(device, device_map, dtype, load_8bit, load_4bit)
    weights_from = path if kind == "full" else Path(model_base)
    # check_loading_info below reports (and raises) on what matters; a damaged weights file is named
    with quiet_load_report(), named_weight_errors(weights_from):
        model, info = model_cls.from_pretrained(
            str(weights_from), config=config, attn_implementation=attn_implementation, key_mapping=TOWER_KEY_MAPPING,
            output_loading_info=True, **kwargs,
        )  # fmt: skip
    allow = () if kind == "full" else (PROJECTOR_PREFIX, "model.image_newline")
    tower_missing = check_loading_info(info, model, allow)
    provided: set[str] = set()
    if kind == "projector":
        load_projector(model, path)
    elif kind == "lora":
        model, provided = merge_lora(model, path)
    check_newline_loaded(info, provided, model_path, model_base)
    tower = model.get_vision_tower()
    if tower_missing:
        tower.load_pretrained(dtype=kwargs["dtype"])
    if hasattr(model, "load_missing_towers"):  # Mini-Gemini's ConvNeXt, when its weights carry none
        model.load_missing_towers(info.get("missing_keys", ()), dtype=kwargs["dtype"])
    tower.vision_tower.requires_grad_(False)
    tokenizer = load_tokenizer(path if kind == "full" else model_base)
    if visionzip is not None:
        model.set_visionzip(visionzip, visionzip_budget)
    if selection is not None:
        model.set_selection(selection)
    model.eval()
    context_len = getattr(config, "max_sequence_length", None) or getattr(config, "max_position_embeddings", 2048)
    return tokenizer, model, tower.image_processor(), context_len


@dataclass(frozen=True)
class VisionZipChoice:
    """The VisionZip stage a run uses (None: off), its budget mode, and where it came from."""

    config: VisionZipConfig | None
    budget: str
    source: str

    def describe(self) -> str:
        """``VisionZip 54+10 (saved in the checkpoint)``, ``without VisionZip (off, as asked)``..."""
        if self.config is None:
            return f"without VisionZip ({self.source})"
        total = " total" if self.budget == "total" else ""
        positions = ", original positions" if self.config.positions == "original" else ""
        return f"VisionZip {self.config.dominant}+{self.config.contextual}{total}{positions} ({self.source})"


def use_visionzip(
    model: PreTrainedModel, requested: VisionZipConfig | None = None, budget: str | None = None, off: bool = False,
    reason: str = "as asked",
) -> VisionZipChoice:  # fmt: skip
    """Set the VisionZip stage of a run: ``requested`` if given, else the checkpoint's own, none with ``off``.

    A VisionZip‡ checkpoint saves the budget its projector was trained on (``visionzip`` in config.json); it runs
    with it unless the caller asks for another or for none. ``budget`` (per_crop | total) overrides the saved mode;
    ``reason`` says where ``requested`` came from. Logs and returns the choice.
    """
    saved = model.config.visionzip_config()
    saved_budget = getattr(model.config, "visionzip_budget", None) or "per_crop"
    if off and requested is not None:
        raise ValueError("VisionZip was both turned off and given a budget: expected one or the other")
    if off:
        choice = VisionZipChoice(None, "per_crop", "off, as asked")
    elif requested is not None:
        choice = VisionZipChoice(requested, budget or saved_budget, reason)
    elif saved is not None:
        choice = VisionZipChoice(saved, budget or saved_budget, "saved in the checkpoint")
    else:
        choice = VisionZipChoice(None, "per_crop", "the checkpoint saves no VisionZip budget")
    if budget is not None and choice.config is None:
        raise ValueError(f"a VisionZip budget mode ({budget!r}) was given but VisionZip is off ({choice.source})")
    if saved is not None and choice.config != saved:
        logger.warning("the checkpoint saves VisionZip %d+%d (its projector may be trained on it); this run: %s",
                       saved.dominant, saved.contextual, choice.describe())  # fmt: skip
    model.set_visionzip(choice.config, choice.budget)
    logger.info("VisionZip: %s", choice.describe())
    return choice
