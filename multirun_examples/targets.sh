#!/usr/bin/env bash
# Question: which modules should carry the adapter: attention only, MLP only, or all linear layers,
#           and what does each cost in trainable parameters, memory and speed?
# Cost: 3 jobs x 500 steps.
# Command:
#   bash multirun_examples/targets.sh
# Smoke form (tiny model on CPU, 3 jobs x 3 steps, ~20 s on 2 cores):
#   bash multirun_examples/targets.sh experiment=smoke train.max_steps=3 train.logging_steps=1 eval.enabled=false
# A custom set: 'lora.target_modules=[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj]' (each list is one job).
set -euo pipefail
${PYTHON:-python} -m sigil_exp -m \
  lora=attn,mlp,all \
  lora.r=16 \
  train.max_steps=500 \
  "$@"
