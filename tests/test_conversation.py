"""Chat templates against hand-written prompts in the formats of LLaVA's released templates."""

from __future__ import annotations

import pytest

from llava.conversation import (
    Conversation,
    SeparatorStyle,
    conv_templates,
    default_conversation,
    get_conv_template,
)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)


def _chat(name: str, *messages: object) -> Conversation:
    """Template `name` with the messages appended alternately as user / assistant."""
    conv = get_conv_template(name)
    for i, message in enumerate(messages):
        conv.append_message(conv.roles[i % 2], message)
    return conv


def test_vicuna_v1_open_turn() -> None:
    prompt = _chat("vicuna_v1", "<image>\nWhat is this?", None).get_prompt()
    assert prompt == VICUNA_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:"


def test_llava_v1_multi_turn() -> None:
    prompt = _chat("llava_v1", "hi", "hello", "bye", None).get_prompt()
    assert prompt == LLAVA_SYSTEM + " USER: hi ASSISTANT: hello</s>USER: bye ASSISTANT:"


def test_v1_alias_and_default() -> None:
    assert conv_templates["v1"] is conv_templates["vicuna_v1"]
    assert default_conversation is conv_templates["vicuna_v1"]
    assert default_conversation.sep_style is SeparatorStyle.TWO


def test_plain_pretraining_prompt() -> None:
    assert _chat("plain", "<image>", "a cat on a mat").get_prompt() == "<image>\na cat on a mat\n"
    assert _chat("plain", "<image>\nWhat is this?", None).get_prompt() == "<image>\nWhat is this?\n"


def test_llava_llama_2_multi_turn() -> None:
    prompt = _chat("llava_llama_2", "hi", "hello", "bye", None).get_prompt()
    expected = "[INST] <<SYS>>\n" + LLAVA_LLAMA_2_SYSTEM + "\n<</SYS>>\n\nhi [/INST] hello </s><s>[INST] bye [/INST]"
    assert prompt == expected


def test_mistral_instruct_has_no_system_block() -> None:
    assert _chat("mistral_instruct", "hi", "hello", "bye", None).get_prompt() == (
        "[INST] hi [/INST] hello </s>[INST] bye [/INST]"
    )


def test_chatml_direct() -> None:
    prompt = _chat("chatml_direct", "<image>\nWhat is this?", None).get_prompt()
    # LLaVA's MPT style puts no newline after <|im_end|>; the released 34B model was trained on exactly this.
    assert prompt == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|><|im_start|>assistant\n"
    )


def test_tuple_message_moves_image_token_to_start() -> None:
    image = object()
    conv = _chat("llava_v1", ("What is in <image> this picture?", image, "Pad"), None)
    assert conv.get_prompt() == LLAVA_SYSTEM + " USER: <image>\nWhat is in  this picture? ASSISTANT:"
    # the stored message keeps its image; only the rendered prompt changes
    assert conv.messages[0][1][1] is image
    already_first = _chat("plain", ("<image>\nDescribe.", image, "Default"), None)
    assert already_first.get_prompt() == "<image>\nDescribe.\n"


def test_dict_drops_images() -> None:
    conv = _chat("vicuna_v1", ("<image>\nhi", object(), "Pad"), "hello")
    assert conv.dict() == {
        "system": VICUNA_SYSTEM,
        "roles": ("USER", "ASSISTANT"),
        "messages": [["USER", "<image>\nhi"], ["ASSISTANT", "hello"]],
        "offset": 0,
        "sep": " ",
        "sep2": "</s>",
    }


def test_copy_is_independent_of_template() -> None:
    conv = get_conv_template("vicuna_v1")
    conv.append_message("USER", "hi")
    clone = conv.copy()
    clone.append_message("ASSISTANT", None)
    clone.messages[0][1] = "changed"
    assert conv.messages == [["USER", "hi"]]
    assert conv_templates["vicuna_v1"].messages == []


def test_unknown_template_lists_names() -> None:
    with pytest.raises(ValueError, match="vicuna_v1"):
        get_conv_template("no_such_template")


def test_llama_2_must_start_with_user() -> None:
    conv = get_conv_template("llava_llama_2")
    conv.append_message("ASSISTANT", "hello")
    with pytest.raises(ValueError, match="USER"):
        conv.get_prompt()


def test_two_style_needs_sep2() -> None:
    with pytest.raises(ValueError, match="sep2"):
        Conversation(system="", roles=("A", "B"), sep_style=SeparatorStyle.TWO, sep=" ")
