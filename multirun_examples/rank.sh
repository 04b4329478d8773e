#!/usr/bin/env bash
# Question: which LoRA rank is best for Rust, and what does each rank cost (trainable params, memory, tokens/s)?
# Cost: 4 jobs x 500 steps (each step: hardware.micro_batch_size x grad_accum sequences of model.max_seq_len).
# Command (the real sweep; any extra override is appended, e.g. model.name_or_path=/models/Llama-3.1-8B-Instruct):
#   bash multirun_examples/rank.sh
# Smoke form (tiny model on CPU, 4 jobs x 3 steps, ~25 s on 2 cores):
#   bash multirun_examples/rank.sh experiment=smoke train.max_steps=3 train.logging_steps=1 eval.enabled=false
# alpha is tied to the rank (alpha = 2r) so every job has the same scale alpha/r and only capacity
# changes; with a fixed alpha the update would shrink as r grows (or use lora=rslora).
# Read the answer: <sweep dir>/report.md (also written at the end of the sweep).
set -euo pipefail
${PYTHON:-python} -m sigil_exp -m \
  lora.r=8,16,32,64 \
  'lora.alpha="${mul:2,${lora.r}}"' \
  train.max_steps=500 \
  "$@"
