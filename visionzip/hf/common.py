"""What the VisionZip subclasses of transformers' LLaVA classes share: the budget in ``config``, its checks, loading."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip.anyres import ViewEncoder
from visionzip.config import VisionZipConfig
from visionzip.encode import encode
from visionzip.encoders import get_adapter, tokens_per_view

CONFIG_KEY = "visionzip"  # model.config.visionzip / processor_config.json "visionzip": VisionZipConfig.to_dict()
SAVED: Any = object()  # from_pretrained's default: the budget the checkpoint's config saves (None if it saves none)
BudgetT = TypeVar("BudgetT")


def as_budget(value: BudgetT | dict | None, budget_class: type[BudgetT], name: str = CONFIG_KEY) -> BudgetT | None:
    """A budget of ``budget_class`` (a frozen config with ``from_dict``) from what users pass or configs store: an
    instance, its dict, or None (off). ``name``: the argument, for the error."""
    if value is None or isinstance(value, budget_class):
        return value
    if isinstance(value, dict):
        return budget_class.from_dict(value)  # type: ignore[attr-defined]
    raise ValueError(f"{name} must be a {budget_class.__name__}, its dict or None, got {type(value).__name__}")


def as_visionzip_config(value: VisionZipConfig | dict | None) -> VisionZipConfig | None:
    """A budget from what users pass or configs store: a :class:`VisionZipConfig`, its dict, or None (off)."""
    return as_budget(value, VisionZipConfig)


def saved_visionzip(config: Any) -> VisionZipConfig | None:
    """The budget written in a transformers config (``config.visionzip``), or None when VisionZip is off."""
    return as_visionzip_config(getattr(config, CONFIG_KEY, None))


def feature_layer_index(vision_feature_layer: Any, num_layers: int) -> int:
    """0-based encoder layer whose output is transformers' ``hidden_states[vision_feature_layer]``.

    transformers counts the embeddings as hidden state 0, so -2 (LLaVA-1.5) is layer ``num_layers - 2``, the same
    layer as ``VisionZipConfig(layer=-2)``; a list of layers (features concatenated) has no single VisionZip layer.
    """
    if isinstance(vision_feature_layer, bool) or not isinstance(vision_feature_layer, int):
        raise ValueError(f"VisionZip needs one int vision_feature_layer, got {vision_feature_layer!r}")
    index = vision_feature_layer + num_layers + 1 if vision_feature_layer < 0 else vision_feature_layer
    if not 1 <= index <= num_layers:
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} is not the output of one of the encoder's {num_layers} layers"
        )
    return index - 1


def check_feature_layer(cfg: VisionZipConfig, vision_feature_layer: Any, num_layers: int) -> None:
    """ValueError unless ``cfg.layer`` is the layer the projector reads (``vision_feature_layer``)."""
    expected = feature_layer_index(vision_feature_layer, num_layers)
    if cfg.resolve_layer(num_layers) != expected:
        raise ValueError(
            f"VisionZip layer={cfg.layer} differs from vision_feature_layer={vision_feature_layer}: the projector was "
            f"trained on that layer's features; use VisionZipConfig(layer={expected - num_layers}, ...)"
        )


def view_prefix(vision_tower: torch.nn.Module) -> int:
    """Encoder tokens before the patches of a view: 1 ([CLS]) or 0."""
    return int(get_adapter(vision_tower).has_cls)


def view_encoder(vision_tower: torch.nn.Module, cfg: VisionZipConfig) -> ViewEncoder:
    """(V, 3, S, S) views -> VisionZip's (V, K, C_vision) tokens and (V, D) dominant positions, by
    :func:`visionzip.encode.encode` on a transformers tower."""

    def run(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = encode(vision_tower, pixels, cfg)
        return out.tokens, out.keep_indices

    return run


def share_weight_conversions(cls: type, parent: type) -> None:
    """Give ``cls`` the checkpoint key renamings transformers applies to ``parent`` (by class name, else model type).

    transformers looks them up by class name and skips classes defined outside it, so without this a llava-hf
    checkpoint (``language_model.model.*`` keys) would not load into a subclass, nor would ``save_pretrained``
    write that layout back. This adds entries for our own class names to transformers' registry; nothing else
    changes.
    """
    mapping = get_checkpoint_conversion_mapping(parent.__name__)
    if mapping is None:
        mapping = get_checkpoint_conversion_mapping(parent.config_class.model_type)
    if mapping is not None:
        register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)


class VisionZipPretrainedMixin:
    """``from_pretrained(..., visionzip=...)`` and :meth:`set_visionzip` for a transformers ``Llava*ForConditional
    Generation``; placed before that class in the bases. The budget lives in ``config.visionzip`` (which the inner
    model shares), so ``save_pretrained`` writes it and ``from_pretrained`` reads it back. ``budget_class``: the
    family's budget type (a frozen config with ``from_dict``/``to_dict``)."""

    budget_class: type = VisionZipConfig

    def _build_with_inner(self, config: Any, pretrained_base: type, inner: type) -> None:
        """The parent's ``__init__`` with its inner model swapped for ``inner``: building the parent's inner model
        first would allocate the whole model twice. The weights keep the parent's names (``model.*``, ``lm_head``)."""
        pretrained_base.__init__(self, config)
        self.model = inner(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, visionzip: VisionZipConfig | dict | None = SAVED, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``; ``visionzip``: the budget (None: off, exactly the parent class);
        not given: the one the checkpoint's config saves, if any."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        model.set_visionzip(model.visionzip_config if visionzip is SAVED else visionzip)
        return loaded

    @property
    def visionzip_config(self) -> Any:
        """The budget in use (``config.visionzip``), or None when VisionZip is off."""
        return as_budget(getattr(self.config, CONFIG_KEY, None), self.budget_class)

    def set_visionzip(self, cfg: Any) -> None:
        """Turn VisionZip on with ``cfg`` (a budget per view) or off (None); checked against the encoder first."""
        cfg = as_budget(cfg, self.budget_class)
        if cfg is not None:
            self._check_visionzip(cfg)
        setattr(self.config, CONFIG_KEY, None if cfg is None else cfg.to_dict())

    def _check_visionzip(self, cfg: VisionZipConfig) -> None:
        if cfg.positions != "packed":
            raise ValueError(
                f"VisionZip positions={cfg.positions!r} is not supported by transformers' classes: use 'packed'"
            )
        tower, vision_config = self.model.vision_tower, self.config.vision_config
        check_feature_layer(cfg, self.config.vision_feature_layer, vision_config.num_hidden_layers)
        has_cls = get_adapter(tower).has_cls
        if cfg.cls_token and not has_cls:
            raise ValueError(f"{type(tower).__name__} has no [CLS] token: use VisionZipConfig(cls_token=False)")
        cfg.check_fits(tokens_per_view(vision_config, has_cls))


def check_call_layer(config: Any, cfg: VisionZipConfig, vision_feature_layer: Any) -> None:
    """A ``vision_feature_layer`` passed at call time must be the config's (the budget was checked against it)."""
    if vision_feature_layer is not None:
        check_feature_layer(cfg, vision_feature_layer, config.vision_config.num_hidden_layers)


def image_output(encoder_tokens: torch.Tensor, features: list[torch.Tensor]) -> BaseModelOutputWithPooling:
    """``get_image_features``' output with VisionZip: ``pooler_output`` holds one (n_i, C_llm) tensor per image,
    ``last_hidden_state`` the (V, dominant + contextual, C_vision) compressed encoder tokens of all views."""
    return BaseModelOutputWithPooling(last_hidden_state=encoder_tokens, pooler_output=features)


class BudgetProcessorMixin:
    """``from_pretrained(..., visionzip=...)`` and :attr:`visionzip_config` for a transformers processor whose
    ``visionzip`` attribute (the budget's dict, saved in ``processor_config.json``) sets its placeholder counts;
    ``budget_class``: the family's budget type."""

    budget_class: type = VisionZipConfig
    visionzip: dict | None

    def _store_budget(self, value: Any) -> None:
        """Keep the budget as JSON, as ``processor_config.json`` stores it."""
        cfg = as_budget(value, self.budget_class)
        self.visionzip = None if cfg is None else cfg.to_dict()

    @classmethod
    def from_pretrained(cls, *args: Any, visionzip: Any = SAVED, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``; ``visionzip``: the budget (None: the parent's count); not given: the
        one ``processor_config.json`` saves, if any. Set after loading: transformers hands a processor's extra
        keyword arguments to its tokenizer too, which would then save the budget in ``tokenizer_config.json``."""
        processor = super().from_pretrained(*args, **kwargs)
        if visionzip is not SAVED:
            processor._store_budget(visionzip)
        return processor

    @property
    def visionzip_config(self) -> Any:
        """The budget the placeholders are counted with, or None (the parent's count)."""
        return as_budget(self.visionzip, self.budget_class)


class VisionZipProcessorMixin(BudgetProcessorMixin):
    """``visionzip`` for a transformers LLaVA processor: the budget whose token count each ``<image>`` expands to.

    Saved in ``processor_config.json`` (an ``__init__`` argument, as transformers saves them) and read back by
    ``from_pretrained``; None: the parent processor's count, unchanged. The arguments before ``visionzip`` are
    those of ``LlavaProcessor`` and ``LlavaNextProcessor``.
    """

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, patch_size: int | None = None,
        vision_feature_select_strategy: str | None = None, chat_template: str | None = None,
        image_token: str = "<image>", num_additional_image_tokens: int = 0,
        visionzip: VisionZipConfig | dict | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        self._store_budget(visionzip)
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
            image_token=image_token, num_additional_image_tokens=num_additional_image_tokens, **kwargs,
        )  # fmt: skip
