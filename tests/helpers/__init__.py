"""Pieces shared by several test files: tiny checkpoints, data, references and checks (not tests themselves)."""
