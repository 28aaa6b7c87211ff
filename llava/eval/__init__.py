"""LLaVA's ``python -m llava.eval.run_llava`` command only; the lmms-eval harness is the top-level ``eval/``."""
