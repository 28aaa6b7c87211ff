"""Mini-Gemini (MGM): LLaVA plus a high-resolution ConvNeXt whose features the CLIP tokens mine (Table 14)."""

from llava.model.mini_gemini.config import MGM_MODEL_TYPE, MiniGeminiConfig
from llava.model.mini_gemini.modeling import MiniGeminiLlamaForCausalLM, MiniGeminiLlamaModel

__all__ = ["MGM_MODEL_TYPE", "MiniGeminiConfig", "MiniGeminiLlamaForCausalLM", "MiniGeminiLlamaModel"]
