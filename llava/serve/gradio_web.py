"""Web demo: ask about an image with all visual tokens and with VisionZip side by side (Gradio, CPU is enough).

Usage::

    python -m llava.serve.gradio_web [--model-path P] [--port 7860]   # or: bash scripts/demo_web.sh

Without ``--model-path`` it runs on the built-in tiny random checkpoint (``python -m llava.tiny``, written to
``--tiny-dir`` once; its answers are noise, its counts and timings are real). Upload an image, set the budget with
the sliders, ask: both chats answer, with the visual tokens the language model received, the time to first token
and the KV cache after the turn (tokens, and their memory in MiB), and the picture of what VisionZip keeps
(:mod:`llava.serve.show`). The right-hand chat may run any of the seven methods instead: DivPrune, VisPruner and
CDPruner (``budget=T`` tokens per view in the options box; CDPruner selects for the question) with the picture of the
patches they keep, or FastV, PDrop and SparseVLM inside the language model. The page says what each number counts
(:func:`legend`). Later questions
continue both chats on their cached image tokens and KV caches; a new image, a new budget or "New chat" starts over.
Needs the ``demo`` extra (``pip install -e ".[demo]"``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llava.cli_options import add_flag
from llava.model.builder import load_pretrained_model
from llava.serve.chat import ChatSession
from llava.serve.compare import CompareBackend, Turn, read_image
from llava.tiny import CHECKPOINT_NAMES, write_tiny_llava
from visionzip.baselines import PruneConfig
from visionzip.baselines.select import SelectionConfig
from visionzip.methods import LLM_METHODS, METHODS, MULTITURN_MODES, SELECTION_METHODS, MethodConfig, method_name

try:
    import gradio as gr
except ImportError as err:  # an optional extra
    raise ImportError('the web demo needs gradio: pip install -e ".[demo]"') from err

logger = logging.getLogger(__name__)

DEFAULT_QUESTION = "What is in the image?"
SIDES = ("full", "vz")  # element ids: chat-full / chat-vz, tokens-full / tokens-vz, ...


@dataclass
class ChatState:
    """One browser tab's conversation: the image, the method, how later turns meet it, and the two chats."""

    key: str
    cfg: MethodConfig
    multiturn: str
    chats: dict[str, ChatSession]
    history: dict[str, list[dict[str, str]]] = field(default_factory=lambda: {side: [] for side in SIDES})

    @property
    def pruning(self) -> PruneConfig | None:
        """The right-hand chat's in-LLM method (None for VisionZip or a selection)."""
        return self.cfg if method_name(self.cfg) in LLM_METHODS else None

    @property
    def selection(self) -> SelectionConfig | None:
        """The right-hand chat's selection (DivPrune, VisPruner, CDPruner), or None."""
        return self.cfg if method_name(self.cfg) in SELECTION_METHODS else None


def _stats(turn: Turn) -> list[Any]:
    """The numbers one side shows: visual tokens, TTFT (ms), KV cache tokens and MiB."""
    return [turn.visual_tokens, round(turn.ttft_ms, 1), turn.kv_tokens, round(turn.kv_bytes / 2**20, 3)]


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> tuple[int, str]:
    """Bytes of KV cache one token takes in the language model, and how they are made up (for the page)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    size = torch.tensor([], dtype=dtype).element_size()
    layers = config.num_hidden_layers
    formula = f"{layers} layers x keys and values x {heads} KV heads x {head_dim} values x {size} bytes"
    return 2 * layers * heads * head_dim * size, formula


def legend(backend: CompareBackend, model_name: str) -> str:
    """The page's header: the model, what a view gives, and what each number of the two chats counts."""
    tower = backend.model.get_vision_tower()
    patches = tower.num_patches_per_side**2
    full = patches + (tower.select_feature == "cls_patch")
    dropped = "" if full > patches else ", [CLS] dropped as LLaVA does"
    per_token, formula = kv_bytes_per_token(backend.model.config, backend.model.dtype)
    return (
        f"## VisionZip on and off: {model_name}\n"
        f"Each view of the image is {patches} patches + [CLS] = {patches + 1} encoder tokens. "
        f"**visual tokens**: what the language model receives for the image, all views: without VisionZip "
        f"{full} per view (the patches{dropped}); with VisionZip, dominant ([CLS] counted among them) + contextual "
        f"per view. **KV cache (tokens)**: every token whose keys and values the language model keeps (the prompts "
        f"with their visual tokens, and the answers so far). **KV cache (MiB)**: their memory, "
        f"{per_token:,} bytes per token here ({formula}). **Method**: the right-hand chat runs VisionZip (the "
        f"sliders) or fastv / pdrop / sparsevlm, which receive every visual token and prune inside the language "
        f"model (options such as layer=1, budget=40; the status line gives the average they kept over the layers)."
    )


@dataclass(frozen=True)
class Request:
    """What the page asks: the image file, the question and the method settings."""

    path: str | None
    question: str
    dominant: float
    contextual: float
    method: str = "visionzip"
    options: str = ""
    multiturn: str = "cache"


def _chat_state(backend: CompareBackend, request: Request, state: ChatState | None) -> tuple[ChatState, Any, Any]:
    """The conversation to continue, or a new one for a new image, method or multi-turn mode; also the image and
    its key."""
    image, key = read_image(request.path)
    cfg = backend.method(request.method, int(request.dominant), int(request.contextual), request.options)
    if state is not None and (state.key, state.cfg, state.multiturn) == (key, cfg, request.multiturn):
        return state, image, key
    same_image = state is not None and state.key == key
    full = state.chats["full"] if same_image else backend.new_chat(image, key, None)
    history_full = state.history["full"] if same_image else []
    chats = {"full": full, "vz": backend.new_chat(image, key, cfg, request.multiturn)}
    return ChatState(key, cfg, request.multiturn, chats, {"full": history_full, "vz": []}), image, key


def status_line(state: ChatState, turns: dict[str, Turn]) -> str:
    """What the right-hand chat received and, for an in-LLM method, what it kept on average over the layers."""
    turn, vz, full = len(state.history["vz"]) // 2, turns["vz"], turns["full"].visual_tokens
    if state.selection is not None:
        instruction = state.chats["vz"].instruction
        chosen = (
            f", chosen for {instruction!r} (later turns: {state.multiturn})"
            if state.selection.name == "cdpruner"
            else ""
        )
        return (f"Turn {turn}: the language model received {vz.visual_tokens} visual tokens with "
                f"{state.selection.describe()}{chosen}; {full} without it.")  # fmt: skip
    if state.pruning is None:
        counts = f"{state.cfg.dominant}+{state.cfg.contextual}"
        return (f"Turn {turn}: the language model received {vz.visual_tokens} visual tokens with VisionZip "
                f"{counts} ([CLS] among the dominant), {full} without it.")  # fmt: skip
    inside = vz.layer_average
    kept = "" if inside is None else f": on average over its layers {inside[0]:.1f} in / {inside[1]:.1f} out"
    return (f"Turn {turn}: the language model received {vz.visual_tokens} visual tokens with "
            f"{state.cfg.describe()} and pruned them inside{kept} (later turns: {state.multiturn}); "
            f"{full} without it.")  # fmt: skip


def answer(backend: CompareBackend, request: Request, state: ChatState | None) -> list[Any]:
    """The Ask button: both chats answer the question; errors go to the status line, the rest is left as it is."""
    if not request.path:
        return _status_only("**Error:** upload an image first.")
    if not request.question or not request.question.strip():
        return _status_only("**Error:** type a question.")
    try:
        state, image, key = _chat_state(backend, request, state)
        question = request.question.strip()
        turns = {side: backend.ask(state.chats[side], question, state.cfg if side == "vz" else None)
                 for side in SIDES}  # fmt: skip
        instruction = state.chats["vz"].instruction  # the question CDPruner's tokens were chosen for
        picture = backend.picture(image, key, state.cfg, instruction) if state.pruning is None else None
    except ValueError as err:
        return _status_only(f"**Error, not asked:** {err}")
    outputs: list[Any] = []
    for side in SIDES:
        history = state.history[side]
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": turns[side].answer}]
        outputs += [history, *_stats(turns[side])]
    return [*outputs, picture, backend.encoder_runs, status_line(state, turns), state]


def _status_only(message: str) -> list[Any]:
    """Outputs that change only the status line (and keep the conversation)."""
    return [gr.skip()] * (len(SIDES) * 5 + 2) + [message, gr.skip()]


def on_upload(path: str | None) -> tuple[Any, str]:
    """Show the uploaded image, or say why it cannot be read."""
    if not path:
        return None, ""
    try:
        image, _ = read_image(path)
    except ValueError as err:
        return None, f"**Error:** {err}"
    return image, f"Loaded a {image.width}x{image.height} image."


def _side_column(side: str, title: str) -> list[Any]:
    """A chat and its four numbers; returns the components in :func:`answer`'s order."""
    with gr.Column():
        chat = gr.Chatbot(label=title, elem_id=f"chat-{side}", height=280)
        with gr.Row():
            numbers = [
                gr.Number(label="visual tokens", elem_id=f"tokens-{side}", interactive=False),
                gr.Number(label="time to first token (ms)", elem_id=f"ttft-{side}", interactive=False),
                gr.Number(label="KV cache (tokens)", elem_id=f"kv-tokens-{side}", interactive=False),
                gr.Number(label="KV cache (MiB)", elem_id=f"kv-mib-{side}", interactive=False),
            ]
    return [chat, *numbers]


def build_demo(backend: CompareBackend, model_name: str) -> gr.Blocks:
    """The page: upload, question and budget on top, the two chats side by side, the kept-token picture below."""
    budget, tokens = backend.default_budget(), backend.patches  # encoder tokens per view: patches + [CLS]
    with gr.Blocks(title="LLaVA + VisionZip", analytics_enabled=False) as demo:
        gr.Markdown(legend(backend, model_name), elem_id="legend")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image", type="filepath", elem_id="image-file")
                preview = gr.Image(label="Uploaded", type="pil", interactive=False, elem_id="preview", height=200)
            with gr.Column(scale=2):
                question = gr.Textbox(label="Question", value=DEFAULT_QUESTION, elem_id="question")
                dominant = gr.Slider(1, tokens, value=budget.dominant, step=1, elem_id="dominant",
                                     label="VisionZip dominant tokens per view ([CLS] included)")  # fmt: skip
                contextual = gr.Slider(0, tokens - 1, value=budget.contextual, step=1, elem_id="contextual",
                                       label="VisionZip contextual (merged) tokens per view")  # fmt: skip
                with gr.Row():
                    method = gr.Radio(list(METHODS), value="visionzip", label="Method (right-hand chat)",
                                      elem_id="method")  # fmt: skip
                    options = gr.Textbox(label="Options of the other methods (e.g. budget=32, important_ratio=0.75; "
                                         "layer=1, budget=40)", elem_id="method-options")  # fmt: skip
                    multiturn = gr.Radio(list(MULTITURN_MODES), value="cache", elem_id="multiturn",
                                         label="Later turns: keep the first choice or choose again")  # fmt: skip
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    new_chat = gr.Button("New chat", elem_id="new-chat")
                status = gr.Markdown(elem_id="status")
        with gr.Row():
            sides = _side_column("full", "All visual tokens") + _side_column("vz", "The method")
        with gr.Row():
            kept = gr.Image(label="What the method keeps", interactive=False, elem_id="kept")
            runs = gr.Number(label="vision encoder runs (all chats)", elem_id="encoder-runs", interactive=False)
        outputs = [*sides, kept, runs, status, state]

        def on_ask(path: str | None, text: str, d: float, c: float, name: str, opts: str, turns: str,
                   current: ChatState | None) -> list[Any]:  # fmt: skip
            return answer(backend, Request(path, text, d, c, name, opts or "", turns), current)

        inputs = [upload, question, dominant, contextual, method, options, multiturn, state]
        ask.click(on_ask, inputs, outputs)
        question.submit(on_ask, inputs, outputs)
        upload.change(on_upload, [upload], [preview, status])
        new_chat.click(lambda: [[], None, [], None, "New chat.", None], None,
                       [sides[0], sides[1], sides[5], sides[6], status, state])  # fmt: skip
    return demo


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags."""
    parser = argparse.ArgumentParser(prog="python -m llava.serve.gradio_web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_flag(parser, "--model-path", default=None, help="default: the built-in tiny checkpoint")
    add_flag(parser, "--model-base", default=None)
    add_flag(parser, "--conv-mode", default=None)
    add_flag(parser, "--tiny-dir", type=Path, default=Path("playground/tiny-llava"), help="where the tiny one goes")
    add_flag(parser, "--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    return parser


def model_path(args: argparse.Namespace) -> str:
    """``--model-path``, or the tiny checkpoint in ``--tiny-dir`` (written on first use)."""
    if args.model_path:
        return args.model_path
    path = args.tiny_dir / CHECKPOINT_NAMES[False]
    if not (path / "config.json").is_file():
        logger.info("writing the tiny checkpoint to %s", args.tiny_dir)
        write_tiny_llava(args.tiny_dir)
    return str(path)


def main(argv: Sequence[str] | None = None) -> None:
    """Load the model and serve the page until interrupted."""
    args = build_parser().parse_args(argv)
    path = model_path(args)
    tokenizer, model, image_processor, context_len = load_pretrained_model(path, args.model_base, device=args.device)
    backend = CompareBackend(tokenizer, model, image_processor, context_len, args.conv_mode, args.max_new_tokens)
    demo = build_demo(backend, path)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts: offline
    demo.queue().launch(server_name=args.host, server_port=args.port, show_error=True, ssr_mode=False, theme=theme,
                        footer_links=[])  # fmt: skip


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
