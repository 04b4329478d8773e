#!/usr/bin/env bash
# Question: should alpha follow the rank (alpha = r: scale 1, or alpha = 2r: scale 2), and does the
#           answer change between a small and a large rank?
# Cost: 4 jobs (2 ranks x 2 alphas) x 500 steps.
# Command:
#   bash multirun_examples/alpha.sh
# Smoke form (tiny model on CPU, 4 jobs x 3 steps, ~20 s on 2 cores):
#   bash multirun_examples/alpha.sh experiment=smoke train.max_steps=3 train.logging_steps=1 eval.enabled=false
# Quoting: Hydra must see each interpolation as one quoted string, and the shell must not expand `$`:
# the whole override goes in single quotes with double quotes inside each value. A fixed alpha can
# join the list: 'lora.alpha=16,"${lora.r}","${mul:2,${lora.r}}"' (6 jobs).
set -euo pipefail
${PYTHON:-python} -m sigil_exp -m \
  lora.r=16,64 \
  'lora.alpha="${lora.r}","${mul:2,${lora.r}}"' \
  train.max_steps=500 \
  "$@"
