"""Chat templates: a Conversation turns (role, message) turns into the exact prompt strings LLaVA was trained on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN

# A message is the text of a turn, None for the open turn the model answers next, or a tuple
# (text, image, image_process_mode) as the demo builds it; only the text goes into the prompt.
Message = str | tuple[Any, ...] | None
PromptTurn = tuple[str, str | None]


class SeparatorStyle(Enum):
    """How turns are joined into a prompt (one formatter per style below)."""

    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    LLAMA_2 = auto()


def _message_text(message: Message) -> str | None:
    """Text of a message: the first element of an image tuple, None for an empty (open) turn."""
    if isinstance(message, tuple):
        return message[0]
    return message if message else None


@dataclass
class Conversation:
    """A chat history and the template that renders it.

    Attributes:
        system: text before the first turn (already wrapped in its markers for MPT/ChatML templates).
        roles: (user role, assistant role) as they appear in the prompt.
        messages: list of [role, message]; message is a str, None (turn left open for generation) or a
            tuple (text, image, image_process_mode).
        offset: number of leading messages that are part of the template (few-shot examples), not the chat.
        sep_style: the formatter used by `get_prompt`.
        sep: separator after user turns (and after the system text).
        sep2: separator after assistant turns for TWO and LLAMA_2 styles (end-of-sequence token).
        version: template family ("v1", "llama_v2", "mpt", ...); the training code dispatches on it.
        skip_next: set by the demo server when a request must not be answered.
    """

    system: str
    roles: tuple[str, str]
    messages: list[list[Message]] = field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"
    skip_next: bool = False

    def __post_init__(self) -> None:
        if self.sep_style in (SeparatorStyle.TWO, SeparatorStyle.LLAMA_2) and self.sep2 is None:
            raise ValueError(f"sep_style {self.sep_style.name} needs sep2 (the end-of-turn separator), got None")
        self.roles = tuple(self.roles)
        self.messages = [list(turn) for turn in self.messages]

    def get_prompt(self) -> str:
        """Render the conversation as the prompt string of its template.

        Returns:
            The prompt; an open last turn (message None) ends with the assistant role so the model answers.
        """
        return _FORMATTERS[self.sep_style](self, self._prompt_turns())

    def _prompt_turns(self) -> list[PromptTurn]:
        """(role, text) pairs, with the image token moved to the start of a first message given as a tuple."""
        turns: list[PromptTurn] = [(role, _message_text(message)) for role, message in self.messages]
        if turns and isinstance(self.messages[0][1], tuple):
            role, text = turns[0]
            text = text or ""
            if not text.startswith(DEFAULT_IMAGE_TOKEN):
                text = DEFAULT_IMAGE_TOKEN + "\n" + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            turns[0] = (role, text)
        return turns

    def append_message(self, role: str, message: Message) -> None:
        """Add one turn; use message=None for the turn the model should generate."""
        self.messages.append([role, message])

    def copy(self) -> Conversation:
        """A copy whose message list can be changed without touching this conversation (or a template)."""
        return dataclasses.replace(self, messages=[[role, message] for role, message in self.messages], skip_next=False)

    def dict(self) -> dict[str, Any]:
        """JSON-friendly view (images dropped from tuple messages), as the LLaVA demo server sends it."""
        messages = [[role, _message_text(m) if isinstance(m, tuple) else m] for role, m in self.messages]
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": messages,
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }


def _format_single(conv: Conversation, turns: list[PromptTurn]) -> str:
    """SYSTEM###ROLE: text###ROLE: text###ROLE:"""
    prompt = conv.system + conv.sep
    for role, text in turns:
        prompt += f"{role}:" if text is None else f"{role}: {text}{conv.sep}"
    return prompt


def _format_two(conv: Conversation, turns: list[PromptTurn]) -> str:
    """SYSTEM USER: text ASSISTANT: text</s>USER: text ASSISTANT:"""
    seps = (conv.sep, conv.sep2)
    prompt = conv.system + conv.sep
    for i, (role, text) in enumerate(turns):
        prompt += f"{role}:" if text is None else f"{role}: {text}{seps[i % 2]}"
    return prompt


def _format_mpt(conv: Conversation, turns: list[PromptTurn]) -> str:
    """SYSTEM<sep>ROLEtext<sep>ROLE (roles carry their own markers, e.g. "<|im_start|>user\\n")."""
    prompt = conv.system + conv.sep
    for role, text in turns:
        prompt += role if text is None else f"{role}{text}{conv.sep}"
    return prompt


def _format_llama_2(conv: Conversation, turns: list[PromptTurn]) -> str:
    """[INST] <<SYS>>\\nSYSTEM\\n<</SYS>>\\n\\ntext [/INST] answer </s><s>[INST] text [/INST]"""
    if not turns or turns[0][1] is None or turns[0][0] != conv.roles[0]:
        raise ValueError(f"LLAMA_2 prompts must start with a non-empty turn of {conv.roles[0]!r}, got {turns[:1]}")
    prompt = ""
    for i, (_, text) in enumerate(turns):
        if text is None:
            continue
        if i == 0 and conv.system:
            text = f"<<SYS>>\n{conv.system}\n<</SYS>>\n\n{text}"
        if i % 2 == 0:
            prompt += f"{conv.sep}[INST] {text} [/INST]"
        else:
            prompt += f" {text} {conv.sep2}"
    return prompt.removeprefix(conv.sep)


def _format_plain(conv: Conversation, turns: list[PromptTurn]) -> str:
    """SYSTEM + each text followed by its separator (pretraining: "<image>\\n" + caption + "\\n")."""
    # LLaVA leaves sep2 None for "plain"; reuse sep so an assistant turn does not fail on None.
    seps = (conv.sep, conv.sep if conv.sep2 is None else conv.sep2)
    prompt = conv.system
    for i, (_, text) in enumerate(turns):
        if text is not None:
            prompt += text + seps[i % 2]
    return prompt


_FORMATTERS: dict[SeparatorStyle, Callable[[Conversation, list[PromptTurn]], str]] = {
    SeparatorStyle.SINGLE: _format_single,
    SeparatorStyle.TWO: _format_two,
    SeparatorStyle.MPT: _format_mpt,
    SeparatorStyle.LLAMA_2: _format_llama_2,
    SeparatorStyle.PLAIN: _format_plain,
}

conv_vicuna_v1 = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    version="v1",
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llava_v1 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("USER", "ASSISTANT"),
    version="v1",
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llava_plain = Conversation(system="", roles=("", ""), sep_style=SeparatorStyle.PLAIN, sep="\n", version="plain")

conv_llava_llama_2 = Conversation(
    system="You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_mistral_instruct = Conversation(
    system="",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
)

conv_mpt = Conversation(
    system="<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_templates: dict[str, Conversation] = {
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llava_v1": conv_llava_v1,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_llama_2": conv_llava_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "mpt": conv_mpt,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
}

default_conversation = conv_templates["vicuna_v1"]


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the template registered under `name` (safe to append messages to).

    Raises:
        ValueError: for an unknown name, listing the available ones.
    """
    if name not in conv_templates:
        raise ValueError(f"unknown conversation template {name!r}; available: {', '.join(sorted(conv_templates))}")
    return conv_templates[name].copy()
