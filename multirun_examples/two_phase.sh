#!/usr/bin/env bash
# Question: does a phase-2 refinement (strictly filtered data, lower LR) from the phase-1 adapter
#           help, and at which phase-2 learning rate?
# Cost: 1 phase-1 job x 1000 steps, then 2 phase-2 jobs x 300 steps (train.lr sweep) from its adapter.
# Command (experiment=phase1/phase2 pick data=phase1/phase2; SIGIL_DATA_JSONL / SIGIL_RUST_DIR
# point them at the corpora, see conf/data/phase1.yaml):
#   bash multirun_examples/two_phase.sh
# Smoke form (tiny model on CPU, bundled sample data, 1 + 2 jobs x 3 steps, ~40 s on 2 cores). The
# phases set experiment=phase1/phase2, so the smoke form names the tiny model and data directly:
#   bash multirun_examples/two_phase.sh model=tiny hardware=cpu data=rust_sample train.max_steps=3 train.logging_steps=1 eval.enabled=false
# Everything lands in $OUT: phase1/ (a run folder with adapter/) and phase2/ (a sweep with report.md).
# PHASE1="..." / PHASE2="..." add overrides to one phase only (split on spaces).
set -euo pipefail
OUT=${OUT:-outputs/two_phase/$(date +%Y-%m-%d_%H-%M-%S)}

# shellcheck disable=SC2086
${PYTHON:-python} -m sigil_exp \
  experiment=phase1 train.max_steps=1000 hydra.run.dir="$OUT/phase1" ${PHASE1:-} "$@"

# shellcheck disable=SC2086
${PYTHON:-python} -m sigil_exp -m \
  experiment=phase2 train.init_adapter="$OUT/phase1/adapter" train.lr=2e-5,5e-5 train.max_steps=300 \
  hydra.sweep.dir="$OUT/phase2" ${PHASE2:-} "$@"
