"""The benchmark tests' tiny shapes (16 px images, patch 4; 3 encoder and 2 LM layers) and request sizes."""

from __future__ import annotations

import torch

from llava.bench.shapes import LanguageShape, LlavaShape
from visionzip.bench import EncoderShape

CPU = torch.device("cpu")
# 16 x 16 images, patch 4: 4 x 4 = 16 patches + [CLS] per view; 3 encoder layers, select layer -2.
TINY_VISION = EncoderShape(hidden=32, layers=3, heads=4, intermediate=64, image_size=16, patch_size=4)
TINY_LM = LanguageShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=100, max_positions=512)
TINY_15 = LlavaShape("llava-1.5-7b", TINY_VISION, TINY_LM, budgets=(8, 4))
TINY_NEXT = LlavaShape("llava-next-7b", TINY_VISION, TINY_LM, budgets=(40, 20), anyres_grid=(2, 2))
TEXT, DECODE, BATCH = 6, 2, 2
