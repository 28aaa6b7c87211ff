"""LLaVA on Mistral (LLaVA-1.6-Mistral)."""

from __future__ import annotations

from torch import nn
from transformers import MistralForCausalLM, MistralModel, MistralPreTrainedModel

from llava.model.config import LlavaMistralConfig
from llava.model.language_model.pruned import PrunedCausalLMMixin, PrunedDecoderMixin
from llava.model.llava_arch import LlavaCausalLMMixin, LlavaMetaModel


class LlavaMistralModel(LlavaMetaModel, PrunedDecoderMixin, MistralModel):
    """``MistralModel`` plus ``vision_tower``, ``mm_projector`` (and ``image_newline``), and the owned decoder loop
    that methods pruning inside the language model use (``config.token_pruning``; off: the parent's forward)."""

    config_class = LlavaMistralConfig

    def __init__(self, config: LlavaMistralConfig) -> None:
        super().__init__(config)
        self.init_multimodal(config)


class LlavaMistralForCausalLM(LlavaCausalLMMixin, PrunedCausalLMMixin, MistralForCausalLM):
    """Released checkpoints' ``LlavaMistralForCausalLM``."""

    config_class = LlavaMistralConfig
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]  # noqa: RUF012

    def __init__(self, config: LlavaMistralConfig) -> None:
        MistralPreTrainedModel.__init__(self, config)
        self.model = LlavaMistralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
