"""Evaluation: the lmms-eval model ``llava_visionzip``, local tasks, and the paper's tables reproduced and rendered."""
