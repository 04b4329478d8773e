#!/usr/bin/env bash
# Question: which learning rate trains the adapter best on Rust (QLoRA's 2e-4 default, or lower/higher)?
# Cost: 4 jobs x 500 steps.
# Command:
#   bash multirun_examples/lr.sh
# Smoke form (tiny model on CPU, 4 jobs x 3 steps, ~25 s on 2 cores):
#   bash multirun_examples/lr.sh experiment=smoke train.max_steps=3 train.logging_steps=1 eval.enabled=false
# The report plots eval loss against train.lr on a log axis (objective_vs_train.lr.png).
set -euo pipefail
${PYTHON:-python} -m sigil_exp -m \
  train.lr=5e-5,1e-4,2e-4,4e-4 \
  train.max_steps=500 \
  "$@"
