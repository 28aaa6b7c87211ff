"""transformers' processor for an export: the tokenizer with ``<image>``, the image processor, the chat template.

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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, normalizers
from transformers import (
    LlavaImageProcessorPil,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedConfig,
)

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import Conversation, SeparatorStyle
from llava.mm_utils import parse_grid_pinpoints, tokenizer_image_token

PROCESSOR_CLASSES: dict[str, type] = {"llava": LlavaProcessor, "llava_next": LlavaNextProcessor}
SELECT_STRATEGIES = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> transformers'
IMAGE_PROCESSOR_KEYS = (
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_convert_rgb",
)  # fmt: skip
# sentencepiece's dummy prefix for the text after a run of image tokens (see the module docstring)
DUMMY_PREFIX_AFTER_IMAGE = Regex(f"{DEFAULT_IMAGE_TOKEN}(?!{DEFAULT_IMAGE_TOKEN})(?=[\\s\\S])")
PROBE_QUESTIONS = ("<image>\nWhat is in the image?", "Describe <image> in one word.", "<image>\n two  spaces ")
PROBE_REPEAT = 3  # image tokens per <image> in the probe prompts


def hf_pinpoints(config: PreTrainedConfig, crop_side: int) -> list[list[int]]:
    """Our ``image_grid_pinpoints`` ((width, height), any form) as transformers' [[height, width], ...]."""
    return [[height, width] for width, height in parse_grid_pinpoints(config.image_grid_pinpoints, crop_side)]


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
{#- one assignment of plain names: vLLM's template analyser reads `set` targets that take `messages` as names -#}
{%- set has_system = messages and messages[0]['role'] == 'system' -%}
{%- set ns = namespace(system=content(messages[0]) if has_system else SYSTEM,
                       turns=messages[1:] if has_system else messages) -%}
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
    return PROCESSOR_CLASSES[family](
        image_processor=image_processor(tower_processor, config, family), tokenizer=tokenizer,
        patch_size=vision.patch_size, vision_feature_select_strategy=SELECT_STRATEGIES[config.mm_vision_select_feature],
        chat_template=chat_template(conv), image_token=DEFAULT_IMAGE_TOKEN, num_additional_image_tokens=1,
    )  # fmt: skip


def declare_backend(tokenizer_config: Path) -> None:
    """Name ``TokenizersBackend`` in the saved tokenizer_config.json: it reads tokenizer.json as written, where a
    ``LlamaTokenizer`` would rebuild its own normalizer and lose the one our tokenization needs."""
    data = json.loads(tokenizer_config.read_text())
    data["tokenizer_class"] = "TokenizersBackend"
    tokenizer_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
