"""Export our LLaVA checkpoints to transformers' llava-hf layout: ``python -m llava.convert --to-hf SRC OUT``.

``SRC`` is any checkpoint :func:`llava.model.builder.load_pretrained_model` reads: LLaVA-1.5 (``image_aspect_ratio``
pad or square, ``flat`` merge) becomes ``LlavaForConditionalGeneration``, LLaVA-1.6/NeXT (``anyres`` with
``spatial_unpad``) ``LlavaNextForConditionalGeneration``; a projector-only or LoRA folder (a VisionZip‡ projector)
is exported on its ``--model-base``. ``OUT`` gets what ``from_pretrained(OUT)`` and ``AutoProcessor.from_pretrained
(OUT)`` read (transformers 5.23): config.json, safetensors weights, generation_config.json, the tokenizer, the image
processor, processor_config.json and the chat template.

Weights: ours ``model.{embed_tokens,layers,norm}`` -> ``model.language_model.*``; ``model.vision_tower.vision_tower.*``
(LLaVA-1.5's tower is read from ``mm_vision_tower``) -> ``model.vision_tower.*``; ``model.mm_projector.{0,2}`` ->
``model.multi_modal_projector.linear_{1,2}``; ``model.image_newline`` stays; ``lm_head`` stays (transformers'
``save_pretrained`` writes its own on-disk names). The weights keep the checkpoint's dtype (``--dtype`` to change).

Image token: ours is the placeholder id -200, outside the vocabulary; transformers' is a real token. ``<image>`` is
added to the tokenizer as a special token, with one embedding row and one ``lm_head`` row, both the mean of the
existing rows (the embedding row is always replaced by image features; a mean ``lm_head`` row gives the mean logit,
never above the largest, so greedy decoding never picks it), and ``generation_config.suppress_tokens`` keeps
sampling off it too. The exported logits have that one extra column; the others equal ours.

Prompts: our LLaVA tokenizes the text between ``<image>`` placeholders chunk by chunk (LLaVA's
``tokenizer_image_token``), transformers' processor the whole expanded prompt at once. For Llama's sentencepiece
tokenizers with ``legacy=false`` (the released LLaVA-1.5/1.6 ones) the chunk after an image then gets
sentencepiece's dummy-prefix "▁" only in ours; the exported tokenizer's normalizer puts that space after each run
of ``<image>`` tokens, so both give the same ids. Every export checks this on probe prompts and raises if the ids
still differ. The tokenizer pads on the left (for batched generation, as our ``generate`` does).

Chat template: the checkpoint's conversation template (``--conv-mode``, default as ``run_llava`` picks it:
``vicuna_v1`` for Llama/Vicuna, ``mistral_instruct`` for Mistral) written in Jinja: a message's images become
``<image>\\n`` before its text, as our evaluation writes them; a leading ``system`` message replaces the system text.

Image processor (the PIL backends, as our preprocessing): LLaVA-1.5's ``pad`` is ``LlavaImageProcessor(do_pad=True)``,
the same square padding with the mean colour, then CLIP's resize and centre crop. LLaVA-NeXT's AnyRes is
``LlavaNextImageProcessor``: the same best-fit resolution, bicubic resize, black padding and crops, and the base view
squashed to a square as LLaVA-NeXT did; its ``image_grid_pinpoints`` are written as (height, width), transformers'
order (ours are (width, height)). Where they differ: with torchvision installed ``AutoProcessor`` picks
transformers' torchvision backend, whose bicubic resize is not PIL's (small pixel differences): pass
``backend="pil"`` for exactly our pixels. The token count of an image in ``LlavaNextProcessor`` is transformers'
formula, which equals the length of our ``spatial_unpad`` layout (the tests check it on non-square images).

VisionZip: a checkpoint that saves a budget (``config.visionzip``, as VisionZip‡ training writes it) keeps it as
``visionzip`` (``VisionZipConfig.to_dict()``) in config.json, where the VisionZip subclasses of transformers'
classes (``visionzip.hf.llava``, ``llava_next_hf``) read it; transformers' own classes ignore the key and
run without VisionZip. Those subclasses take one budget per view with packed positions: a ``total`` budget over a
NeXT image's views or ``positions="original"`` cannot be expressed there and raises.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, normalizers
from transformers import (
    LlamaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import LlavaConfig as HFLlavaConfig
from transformers import LlavaNextConfig as HFLlavaNextConfig

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import Conversation, SeparatorStyle, get_conv_template
from llava.eval.run_llava import default_conv_mode
from llava.mm_utils import parse_grid_pinpoints, tokenizer_image_token
from llava.model.builder import load_pretrained_model, read_config
from llava.model.config import LlavaConfig, LlavaConfigMixin, LlavaMistralConfig
from llava.model.hub import local_checkpoint
from llava.model.placement import parse_dtype

logger = logging.getLogger(__name__)

HF_CLASSES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel], type]] = {
    "llava": (HFLlavaConfig, LlavaForConditionalGeneration, LlavaProcessor),
    "llava_next": (HFLlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor),
}
TEXT_CONFIGS: dict[type[PreTrainedConfig], type[PreTrainedConfig]] = {
    LlavaConfig: LlamaConfig,
    LlavaMistralConfig: MistralConfig,
}
# our parameter names (prefix) -> those of transformers' Llava*ForConditionalGeneration, first match wins
KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
EMBEDDING_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
PROJECTOR_TYPE = "mlp2x_gelu"  # transformers' projector: Linear, GELU, Linear
SELECT_STRATEGIES = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> transformers'
IMAGE_PROCESSOR_KEYS = (
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_convert_rgb",
)  # fmt: skip
# sentencepiece's dummy prefix for the text after a run of image tokens (see the module docstring)
DUMMY_PREFIX_AFTER_IMAGE = Regex(f"{DEFAULT_IMAGE_TOKEN}(?!{DEFAULT_IMAGE_TOKEN})(?=[\\s\\S])")
PROBE_QUESTIONS = ("<image>\nWhat is in the image?", "Describe <image> in one word.", "<image>\n two  spaces ")
PROBE_REPEAT = 3  # image tokens per <image> in the probe prompts


def _listed(keys: Sequence[str], limit: int = 20) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


# --- what can be exported --------------------------------------------------------------------------------------------
def hf_family(config: PreTrainedConfig) -> str:
    """``"llava"`` or ``"llava_next"``: the transformers family of our config; ValueError naming what does not fit."""
    problems = []
    if type(config) not in TEXT_CONFIGS:
        problems.append(f"config class {type(config).__name__} (expected one of {[c.__name__ for c in TEXT_CONFIGS]})")
    if config.mm_projector_type != PROJECTOR_TYPE:
        problems.append(f"mm_projector_type {config.mm_projector_type!r} (transformers' projector is {PROJECTOR_TYPE})")
    if config.mm_use_im_start_end or config.mm_use_im_patch_token:
        problems.append("mm_use_im_start_end / mm_use_im_patch_token (transformers adds no image start/end tokens)")
    if config.mm_vision_select_feature not in SELECT_STRATEGIES:
        problems.append(f"mm_vision_select_feature {config.mm_vision_select_feature!r}")
    aspect, merge = config.image_aspect_ratio or "square", config.mm_patch_merge_type or "flat"
    family = "llava_next" if aspect == "anyres" else "llava"
    if aspect not in ("square", "pad", "anyres"):
        problems.append(f"image_aspect_ratio {aspect!r} (expected square, pad or anyres)")
    elif family == "llava" and merge != "flat":
        problems.append(f"mm_patch_merge_type {merge!r} with image_aspect_ratio {aspect!r} (expected flat)")
    elif family == "llava_next" and merge != "spatial_unpad":
        problems.append(f"mm_patch_merge_type {merge!r} with anyres (transformers' LLaVA-NeXT is spatial_unpad)")
    if problems:
        raise ValueError("cannot export to transformers' LLaVA classes: " + "; ".join(problems))
    return family


def visionzip_entry(config: PreTrainedConfig, family: str) -> dict | None:
    """The exported ``visionzip`` value (``VisionZipConfig.to_dict()``), or None when the checkpoint saves none."""
    cfg = config.visionzip_config()
    if cfg is None:
        return None
    if cfg.positions != "packed":
        raise ValueError(
            f"the checkpoint saves VisionZip positions={cfg.positions!r}; transformers' classes place visual tokens "
            "packed only: expected positions='packed'"
        )
    if family == "llava_next" and getattr(config, "visionzip_budget", "per_crop") != "per_crop":
        raise ValueError(
            f"the checkpoint saves a VisionZip budget of {cfg.tokens} in total over each image's views; the "
            "transformers classes take one budget per view: expected visionzip_budget='per_crop'"
        )
    return cfg.to_dict()


# --- config ----------------------------------------------------------------------------------------------------------
def text_config(config: PreTrainedConfig, vocab_size: int) -> PreTrainedConfig:
    """The language model's config alone (Llama or Mistral): our config without LLaVA's keys, ``vocab_size`` set."""
    text_cls = TEXT_CONFIGS[type(config)]
    fields = {f.name for f in dataclasses.fields(text_cls)} - {f.name for f in dataclasses.fields(LlavaConfigMixin)}
    data = {k: v for k, v in config.to_dict().items() if k in fields and k not in ("architectures", "dtype")}
    return text_cls(**{**data, "vocab_size": vocab_size})


def hf_pinpoints(config: PreTrainedConfig, crop_side: int) -> list[list[int]]:
    """Our ``image_grid_pinpoints`` ((width, height), any form) as transformers' [[height, width], ...]."""
    return [[height, width] for width, height in parse_grid_pinpoints(config.image_grid_pinpoints, crop_side)]


def hf_config(
    config: PreTrainedConfig, vision: PreTrainedConfig, family: str, image_token_id: int, vocab_size: int
) -> PreTrainedConfig:
    """transformers' ``LlavaConfig`` / ``LlavaNextConfig`` for our config and its tower's ``CLIPVisionConfig``."""
    side = vision.image_size // vision.patch_size
    strategy = SELECT_STRATEGIES[config.mm_vision_select_feature]
    vision_dict = {k: v for k, v in vision.to_dict().items() if k != "_name_or_path"}  # a local path of the source
    kwargs: dict[str, Any] = dict(
        text_config=text_config(config, vocab_size), vision_config=vision_dict,
        image_token_index=image_token_id, projector_hidden_act="gelu", multimodal_projector_bias=True,
        vision_feature_layer=config.mm_vision_select_layer, vision_feature_select_strategy=strategy,
        image_seq_length=side * side + (1 if strategy == "full" else 0), tie_word_embeddings=False,
        pad_token_id=config.pad_token_id,
    )  # fmt: skip
    if family == "llava_next":
        kwargs["image_grid_pinpoints"] = hf_pinpoints(config, vision.image_size)
    out = HF_CLASSES[family][0](**kwargs)
    budget = visionzip_entry(config, family)
    if budget is not None:
        out.visionzip = budget
    return out


# --- weights ---------------------------------------------------------------------------------------------------------
def rename_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names -> transformers' (``KEY_PREFIXES``); ValueError naming any key it cannot place."""
    renamed, unplaced = {}, []
    for key, value in state.items():
        prefix = next((p for p in KEY_PREFIXES if key.startswith(p[0])), None)
        if prefix is None:
            unplaced.append(key)
        else:
            renamed[prefix[1] + key.removeprefix(prefix[0])] = value
    if unplaced:
        raise ValueError(f"weights with no place in transformers' LLaVA classes: {_listed(unplaced)}")
    return renamed


def add_image_token_rows(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Grow the embedding (V, C) and ``lm_head`` (V, C) to ``vocab_size`` rows, each new row their mean row."""
    out = dict(state)
    for key in EMBEDDING_KEYS:
        weight = state[key]  # (V, C)
        extra = vocab_size - weight.shape[0]
        if extra > 0:
            mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, C)
            out[key] = torch.cat([weight, mean.expand(extra, -1)])
    return out


def build_hf_model(config: PreTrainedConfig, family: str, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """transformers' model for ``config`` holding ``state`` (no copy: built on the meta device, then assigned).

    ValueError naming the parameters ``state`` lacks or has in excess.
    """
    with torch.device("meta"):
        model = HF_CLASSES[family][1](config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not fill transformers' {type(model).__name__}: missing [{_listed(list(missing))}]; "
            f"unexpected [{_listed(list(unexpected))}]"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# --- tokenizer, image processor, chat template ----------------------------------------------------------------------
def _collapsed(ids: Sequence[int], image_token_id: int) -> list[int]:
    """Token ids with each run of ``image_token_id`` replaced by one ``IMAGE_TOKEN_INDEX`` (our placeholder)."""
    out: list[int] = []
    for token in ids:
        if token != image_token_id:
            out.append(int(token))
        elif not out or out[-1] != IMAGE_TOKEN_INDEX:
            out.append(IMAGE_TOKEN_INDEX)
    return out


def probe_prompts(conv: Conversation) -> list[str]:
    """Prompts of ``conv``'s template with an image, to compare the two ways of tokenizing them."""
    prompts = []
    for question in PROBE_QUESTIONS:
        chat = conv.copy()
        chat.append_message(chat.roles[0], question)
        chat.append_message(chat.roles[1], None)
        prompts.append(chat.get_prompt())
    return prompts


def prompt_mismatch(tokenizer: Any, expected: list[list[int]], prompts: list[str], image_token_id: int) -> str | None:
    """None when ``tokenizer`` on each prompt (every ``<image>`` repeated) gives ``expected`` up to the image runs;
    else a description of the first difference."""
    for prompt, ids in zip(prompts, expected, strict=True):
        got = _collapsed(tokenizer(prompt.replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IMAGE_TOKEN * PROBE_REPEAT)).input_ids,
                         image_token_id)  # fmt: skip
        if got != ids:
            return f"{prompt!r}: our LLaVA's ids {ids}, the exported tokenizer's {got} (-200: the image)"
    return None


def export_tokenizer(tokenizer: Any, conv: Conversation) -> int:
    """Add ``<image>`` to ``tokenizer`` (in place) so that whole prompts split as our chunked tokenization; its id.

    ValueError if the ids still differ on the probe prompts (see the module docstring).
    """
    prompts = probe_prompts(conv)
    expected = [tokenizer_image_token(p, tokenizer) for p in prompts]
    tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    tokenizer.padding_side = "left"
    if prompt_mismatch(tokenizer, expected, prompts, image_token_id) is None:
        return image_token_id
    backend = tokenizer.backend_tokenizer
    # matched on the normalized text, where the normalizer has put sentencepiece's dummy-prefix space after it
    backend.add_special_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=True)])
    prefix = normalizers.Replace(DUMMY_PREFIX_AFTER_IMAGE, DEFAULT_IMAGE_TOKEN + " ")
    backend.normalizer = prefix if backend.normalizer is None else normalizers.Sequence([backend.normalizer, prefix])
    mismatch = prompt_mismatch(tokenizer, expected, prompts, image_token_id)
    if mismatch is not None:
        raise ValueError(f"the exported tokenizer splits prompts unlike our LLaVA: {mismatch}")
    return image_token_id


def image_processor(tower_processor: Any, config: PreTrainedConfig, family: str) -> Any:
    """transformers' LLaVA / LLaVA-NeXT image processor (PIL backend) doing what our ``process_images`` does."""
    saved = tower_processor.to_dict()  # as preprocessor_config.json holds it
    kwargs = {key: saved[key] for key in IMAGE_PROCESSOR_KEYS if key in saved}
    if family == "llava":
        return LlavaImageProcessorPil(**kwargs, do_pad=config.image_aspect_ratio == "pad")
    pinpoints = hf_pinpoints(config, kwargs["crop_size"]["height"])
    return LlavaNextImageProcessorPil(**kwargs, image_grid_pinpoints=pinpoints, do_pad=True)


def _jinja(text: str) -> str:
    """A Jinja string literal (JSON's escapes are Python's, which Jinja reads)."""
    return json.dumps(text)


TEMPLATE_PRELUDE = """\
{%- macro content(message) -%}
{%- if message['content'] is string -%}{{ message['content'] }}
{%- else -%}
{%- for item in message['content'] if item['type'] == 'image' -%}{{ IMAGE + '\\n' }}{%- endfor -%}
{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}
{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(system=SYSTEM, turns=messages) -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set ns.system = content(messages[0]) -%}{%- set ns.turns = messages[1:] -%}
{%- endif -%}
"""
TEMPLATE_BODIES = {
    SeparatorStyle.TWO: """{{- ns.system + SEP -}}
{%- for m in ns.turns -%}
{{- (USER if m['role'] == 'user' else ASSISTANT) + ': ' + content(m) + (SEP if loop.index0 % 2 == 0 else SEP2) -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- ASSISTANT + ':' -}}{%- endif -%}""",
    SeparatorStyle.SINGLE: """{{- ns.system + SEP -}}
{%- for m in ns.turns -%}{{- (USER if m['role'] == 'user' else ASSISTANT) + ': ' + content(m) + SEP -}}{%- endfor -%}
{%- if add_generation_prompt -%}{{- ASSISTANT + ':' -}}{%- endif -%}""",
    SeparatorStyle.MPT: """{{- ns.system + SEP -}}
{%- for m in ns.turns -%}{{- (USER if m['role'] == 'user' else ASSISTANT) + content(m) + SEP -}}{%- endfor -%}
{%- if add_generation_prompt -%}{{- ASSISTANT -}}{%- endif -%}""",
    SeparatorStyle.LLAMA_2: """{%- for m in ns.turns -%}
{%- set text = content(m) -%}
{%- if loop.first and ns.system -%}{%- set text = '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' + text -%}{%- endif -%}
{%- if loop.index0 % 2 == 0 -%}{{- ('' if loop.first else SEP) + '[INST] ' + text + ' [/INST]' -}}
{%- else -%}{{- ' ' + text + ' ' + SEP2 -}}{%- endif -%}
{%- endfor -%}""",
}


def chat_template(conv: Conversation) -> str:
    """``conv``'s template as a Jinja chat template giving ``conv.get_prompt()`` for the same turns.

    Messages: ``{"role": "user"|"assistant"|"system", "content": str | [{"type": "image"}, {"type": "text",
    "text": ...}]}``; ``add_generation_prompt`` opens the assistant's turn as ``get_prompt`` does.
    """
    if conv.sep_style not in TEMPLATE_BODIES:
        raise ValueError(
            f"no chat template for separator style {conv.sep_style.name}: expected one of "
            f"{[s.name for s in TEMPLATE_BODIES]}"
        )
    constants = {
        "IMAGE": DEFAULT_IMAGE_TOKEN, "SYSTEM": conv.system, "SEP": conv.sep, "SEP2": conv.sep2 or "",
        "USER": conv.roles[0], "ASSISTANT": conv.roles[1],
    }  # fmt: skip
    header = "".join(f"{{%- set {name} = {_jinja(value)} -%}}\n" for name, value in constants.items())
    return header + TEMPLATE_PRELUDE + TEMPLATE_BODIES[conv.sep_style]


def build_processor(
    tokenizer: Any, tower_processor: Any, config: PreTrainedConfig, family: str, vision: Any, conv: Conversation
) -> Any:
    """transformers' LLaVA / LLaVA-NeXT processor; the tokenizer must hold ``<image>`` (:func:`export_tokenizer`)."""
    return HF_CLASSES[family][2](
        image_processor=image_processor(tower_processor, config, family), tokenizer=tokenizer,
        patch_size=vision.patch_size, vision_feature_select_strategy=SELECT_STRATEGIES[config.mm_vision_select_feature],
        chat_template=chat_template(conv), image_token=DEFAULT_IMAGE_TOKEN, num_additional_image_tokens=1,
    )  # fmt: skip


# --- the export ------------------------------------------------------------------------------------------------------
def declare_backend(tokenizer_config: Path) -> None:
    """Name ``TokenizersBackend`` in the saved tokenizer_config.json: it reads tokenizer.json as written, where a
    ``LlamaTokenizer`` would rebuild its own normalizer and lose the one our tokenization needs."""
    data = json.loads(tokenizer_config.read_text())
    data["tokenizer_class"] = "TokenizersBackend"
    tokenizer_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def source_dtype(src: str | Path) -> torch.dtype:
    """The dtype ``src`` was saved in (config.json's ``torch_dtype``/``dtype``), float32 if it names none."""
    dtype = getattr(read_config(local_checkpoint(str(src), weights=False)), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: expected a new or empty folder for the export")


def export_to_hf(
    src: str | Path, out: str | Path, model_base: str | None = None, conv_mode: str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:  # fmt: skip
    """Write checkpoint ``src`` (on ``model_base`` for projector-only/LoRA folders) to ``out`` in the llava-hf layout.

    ``conv_mode``: the chat template (default: the one ``run_llava`` uses for this backbone); ``dtype``: of the
    exported weights (default: the checkpoint's). Returns ``out``. Raises ValueError for a source it cannot convert.
    """
    out = Path(out)
    _check_out(out)
    dtype = parse_dtype(dtype) or source_dtype(src)
    tokenizer, model, tower_processor, _ = load_pretrained_model(
        str(src), model_base, device="cpu", device_map=None, dtype=dtype
    )
    config = model.config
    family = hf_family(config)
    conv = get_conv_template(conv_mode or default_conv_mode(config))
    image_token_id = export_tokenizer(tokenizer, conv)
    vocab_size = max(config.vocab_size, image_token_id + 1)
    vision = model.get_vision_tower().config
    exported = hf_config(config, vision, family, image_token_id, vocab_size)
    state = add_image_token_rows(rename_state_dict(model.state_dict()), vocab_size)
    hf_model = build_hf_model(exported, family, state)
    hf_model.generation_config = copy.deepcopy(model.generation_config)
    hf_model.generation_config.suppress_tokens = [image_token_id]
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    build_processor(tokenizer, tower_processor, config, family, vision, conv).save_pretrained(out)
    declare_backend(out / "tokenizer_config.json")
    logger.info("exported %s (%s) to %s as %s", src, family, out, type(hf_model).__name__)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m llava.convert --to-hf SRC OUT [--model-base BASE]``."""
    parser = argparse.ArgumentParser(prog="python -m llava.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--to-hf", nargs=2, metavar=("SRC", "OUT"), required=True,
                        help="our checkpoint folder (or hub id) and a new folder for the llava-hf export")  # fmt: skip
    parser.add_argument("--model-base", default=None, help="the base LLaVA/LLM of a projector-only or LoRA SRC")
    parser.add_argument("--conv-mode", default=None, help="chat template (default: as run_llava picks it)")
    parser.add_argument("--dtype", default=None, help="dtype of the exported weights (default: the checkpoint's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    src, out = args.to_hf
    try:
        export_to_hf(src, out, args.model_base, args.conv_mode, args.dtype)
    except ValueError as err:
        parser.error(str(err))
    print(out)


if __name__ == "__main__":
    main()
