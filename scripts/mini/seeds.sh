#!/usr/bin/env bash
# The miniature over several training seeds (after the main job, which trained seed 0): the other seeds reuse its
# data, CLIP and LLM, train and evaluate under $OUT/seed-<k>/, then $OUT/seeds.md gives every row as mean ± sd, the
# tests over seeds (VisionZip against random patches, dominant-only, the other layout and each comparison method) and
# the multi-turn table. SEEDS: default "0 1 2 3 4 5", the fewest with which a paired test over seeds can reach
# p < 0.05; the measured spread asks for about 13 to find a real 3-point difference (eval/mini/RESULTS.md). About 9 min
# per seed on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-0 1 2 3 4 5} bash scripts/mini/reproduce.sh --no-preflight "$@"
