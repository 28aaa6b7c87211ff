"""Our LLaVA models; importing this registers them with transformers' Auto classes (their plugin mechanism)."""

from transformers import AutoConfig, AutoModelForCausalLM

from llava.model.config import LlavaConfig, LlavaMistralConfig
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM, LlavaLlamaModel
from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM, LlavaMistralModel
from llava.model.mini_gemini import MGM_MODEL_TYPE, MiniGeminiConfig, MiniGeminiLlamaForCausalLM

AutoConfig.register("llava_llama", LlavaConfig, exist_ok=True)
AutoConfig.register("llava_mistral", LlavaMistralConfig, exist_ok=True)
AutoConfig.register(MGM_MODEL_TYPE, MiniGeminiConfig, exist_ok=True)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(LlavaMistralConfig, LlavaMistralForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(MiniGeminiConfig, MiniGeminiLlamaForCausalLM, exist_ok=True)

__all__ = [
    "LlavaConfig",
    "LlavaLlamaForCausalLM",
    "LlavaLlamaModel",
    "LlavaMistralConfig",
    "LlavaMistralForCausalLM",
    "LlavaMistralModel",
    "MiniGeminiConfig",
    "MiniGeminiLlamaForCausalLM",
]
