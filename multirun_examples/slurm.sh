#!/usr/bin/env bash
# Question: the rank x target-module grid on a SLURM cluster, one GPU job per combination.
# Cost: 8 jobs (4 ranks x 2 target sets) x 1000 steps; at most hydra.launcher.array_parallelism at once.
# Command (run on the login node; the sweep waits for the array, then writes report.md):
#   PARTITION=gpu bash multirun_examples/slurm.sh
# Knobs (conf/hydra/launcher/slurm.yaml): hydra.launcher.partition, .gpus_per_node (per job),
#   .timeout_min (--time), .cpus_per_task, .mem_gb, .account, .qos, .constraint, .array_parallelism,
#   .setup (shell lines before each job, e.g. activating the venv). Paths must be on a shared filesystem.
# Smoke form (no cluster needed: submitit's local executor, one process per job; a 2-job slice of
# the grid, 2 at a time, since the local executor starts a whole batch at once; ~45 s on 2 cores):
#   LAUNCHER=submitit_local bash multirun_examples/slurm.sh experiment=smoke train.max_steps=3 train.logging_steps=1 eval.enabled=false lora.r=4,8 lora=attn hydra.sweeper.max_batch_size=2
set -euo pipefail
LAUNCHER=${LAUNCHER:-slurm}
PARTITION_ARG=()
if [ "$LAUNCHER" = slurm ] && [ -n "${PARTITION:-}" ]; then PARTITION_ARG=(hydra.launcher.partition="$PARTITION"); fi
${PYTHON:-python} -m sigil_exp -m \
  hydra/launcher="$LAUNCHER" "${PARTITION_ARG[@]}" \
  lora.r=8,16,32,64 'lora.alpha="${mul:2,${lora.r}}"' \
  lora=attn,all \
  train.max_steps=1000 train.resume=auto \
  "$@"
