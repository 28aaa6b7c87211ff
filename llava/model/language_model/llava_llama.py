"""LLaVA on Llama / Vicuna (LLaVA-1.5, LLaVA-1.6-Vicuna)."""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

from llava.model.config import LlavaConfig
from llava.model.language_model.pruned import PrunedCausalLMMixin, PrunedDecoderMixin
from llava.model.llava_arch import LlavaCausalLMMixin, LlavaMetaModel


class LlavaLlamaModel(LlavaMetaModel, PrunedDecoderMixin, LlamaModel):
    """``LlamaModel`` plus ``vision_tower``, ``mm_projector`` (and ``image_newline``), and the owned decoder loop
    that methods pruning inside the language model use (``config.token_pruning``; off: the parent's forward)."""

    config_class = LlavaConfig

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__(config)
        self.init_multimodal(config)


class LlavaLlamaForCausalLM(LlavaCausalLMMixin, PrunedCausalLMMixin, LlamaForCausalLM):
    """Released checkpoints' ``LlavaLlamaForCausalLM``; weights read as ``model.*`` and ``lm_head.weight``."""

    config_class = LlavaConfig
    # LLaVA-1.5's .bin shards carry Llama's old rotary buffers; they are recomputed, never loaded.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]  # noqa: RUF012

    def __init__(self, config: LlavaConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
