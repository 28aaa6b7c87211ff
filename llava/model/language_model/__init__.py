"""LLaVA on each language-model family, as subclasses of transformers' causal LMs."""
