#!/usr/bin/env bash
# Question: does a phase-2 refinement (strictly filtered data, lower LR) from the phase-1 adapter
#           help, and at which phase-2 learning rate?
# Cost: 1 phase-1 job x 1000 steps, then 2 phase-2 jobs x 300 steps (train.lr sweep) from its adapter.
# Command (point each phase at its data, e.g. PHASE1="data=jsonl data.sources.0.path=/data/p1.jsonl"):
#   bash multirun_examples/two_phase.sh
# Smoke form (tiny model on CPU, 1 + 2 jobs x 3 steps, ~1 min on 2 cores). The phases set
# experiment=phase1/phase2, so the smoke form names the tiny model directly instead of experiment=smoke:
#   bash multirun_examples/two_phase.sh model=tiny hardware=cpu train.max_steps=3
# Everything lands in $OUT: phase1/ (a run folder with adapter/) and phase2/ (a sweep with report.md).
set -euo pipefail
OUT=${OUT:-outputs/two_phase/$(date +%Y-%m-%d_%H-%M-%S)}
PHASE1=${PHASE1:-}   # extra overrides for phase 1 only (its data), word-split on spaces
PHASE2=${PHASE2:-}   # extra overrides for phase 2 only, e.g. "data=jsonl data.sources.0.path=/data/p2_strict.jsonl"

# shellcheck disable=SC2086
${PYTHON:-python} -m sigil_exp \
  experiment=phase1 train.max_steps=1000 hydra.run.dir="$OUT/phase1" $PHASE1 "$@"

# shellcheck disable=SC2086
${PYTHON:-python} -m sigil_exp -m \
  experiment=phase2 train.init_adapter="$OUT/phase1/adapter" train.lr=2e-5,5e-5 train.max_steps=300 \
  hydra.sweep.dir="$OUT/phase2" $PHASE2 "$@"
