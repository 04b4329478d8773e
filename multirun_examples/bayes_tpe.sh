#!/usr/bin/env bash
# Question: which combination of rank, alpha, learning rate and target modules is best, searched
#           with a Bayesian optimiser (optuna TPE) instead of a full grid?
# Cost: 20 trials x 500 steps (hydra.sweeper.n_trials); the search space is in
#       conf/hydra/sweeper/lora_tpe.yaml (r 8-64, alpha 8-128, lr 3e-5-1e-3 log, lora=attn|mlp|all).
# Command:
#   bash multirun_examples/bayes_tpe.sh
# Smoke form (tiny model on CPU, 3 trials x 3 steps, ~20 s on 2 cores):
#   bash multirun_examples/bayes_tpe.sh experiment=smoke train.max_steps=3 train.logging_steps=1 eval.enabled=false hydra.sweeper.n_trials=3
# Objective: sweep.objective (default eval/loss, minimize). Once the Rust evaluation runs with training:
#   bash multirun_examples/bayes_tpe.sh eval.enabled=true sweep.objective=eval/pass@1 sweep.direction=maximize
# The sampler is seeded and the study is stored in <sweep dir>/optuna.db (sqlite). An interrupted
# search continues when rerun into the same folder (it runs n_trials more; TPE sees all earlier ones):
#   bash multirun_examples/bayes_tpe.sh hydra.sweep.dir=multirun/<date>/<time>
# Best trial: <sweep dir>/optimization_results.yaml; every trial: <sweep dir>/report.md.
set -euo pipefail
${PYTHON:-python} -m sigil_exp -m \
  hydra/sweeper=lora_tpe \
  train.max_steps=500 \
  "$@"
