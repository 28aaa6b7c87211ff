"""Evaluation harnesses that reproduce the paper's tables (lmms-eval plugin and tables: planned)."""
