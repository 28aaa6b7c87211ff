"""Evaluation entry points: one-shot questions about images (``run_llava``)."""
