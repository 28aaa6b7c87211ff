"""The owned decoder loop for methods that prune image tokens inside a language model (FastV, PDrop, SparseVLM),
shared by our LLaVA (``llava.model.language_model``) and the subclasses of transformers' classes (``visionzip.hf``)."""
