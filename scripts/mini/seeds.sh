#!/usr/bin/env bash
# The miniature over three training seeds (after the main job, which trained seed 0): seeds 1 and 2 reuse its data,
# CLIP and LLM, train and evaluate under $OUT/seed-<k>/, then $OUT/seeds.md gives every row as mean ± sd and the
# paired tests (same questions) of VisionZip against random patches and dominant-only. ~13 min per extra seed.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-0 1 2} bash scripts/mini/reproduce.sh --no-preflight "$@"
