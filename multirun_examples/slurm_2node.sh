#!/usr/bin/env bash
# Question: the rank sweep with each job spread over 2 nodes x 8 GPUs (data parallel, 16 GPUs): the same
#   global batch as on one GPU, in a fraction of the wall time (2 x H200 measured 93% scaling efficiency).
# Cost: 4 jobs x 1000 steps, each on 2 nodes x 8 GPUs (8 node allocations in all, hydra.launcher.array_parallelism
#   at a time); at 8B about 1000 x 2.4 s / 16 / 0.9 = ~3 min of training per job.
# Command (on the login node; the sweep waits for the jobs, then writes report.md):
#   PARTITION=gpu bash multirun_examples/slurm_2node.sh
# How: submitit starts one task per node (hydra.launcher.nodes=2, tasks_per_node=1, gpus_per_node=8).
#   Each task runs torch's elastic launcher for its 8 local workers (hardware.nproc_per_node=8); the nodes
#   meet at the allocation's first node, port 29500 (c10d rendezvous, run id = the SLURM job id). Rank 0
#   alone writes the job folder and its W&B run; hardware.global_batch=64 keeps the batch per step fixed.
# Dry-run form (no cluster: prints what node 1 of such an allocation would start, then stops):
#   SLURM_JOB_NODELIST='gpu[01-02]' SLURM_NNODES=2 SLURM_NODEID=1 SLURM_JOB_ID=1234 python -m sigil_exp \
#     hardware=h200 hardware.nproc_per_node=8 hardware.nnodes=2 hardware.global_batch=64 dry_run=true
# Smoke form (no cluster, no GPU: submitit's local executor, each job 2 CPU processes on gloo, 2 jobs; ~3 min):
#   LAUNCHER=submitit_local bash multirun_examples/slurm_2node.sh experiment=smoke hardware=cpu hardware.nnodes=1 hardware.nproc_per_node=2 hardware.global_batch=8 hydra.launcher.nodes=1 hydra.launcher.gpus_per_node=0 lora.r=4,8 hydra.sweeper.max_batch_size=1
set -euo pipefail
LAUNCHER=${LAUNCHER:-slurm}
PARTITION_ARG=()
if [ "$LAUNCHER" = slurm ] && [ -n "${PARTITION:-}" ]; then PARTITION_ARG=(hydra.launcher.partition="$PARTITION"); fi
${PYTHON:-python} -m sigil_exp -m \
  hydra/launcher="$LAUNCHER" "${PARTITION_ARG[@]}" \
  hydra.launcher.nodes=2 hydra.launcher.tasks_per_node=1 hydra.launcher.gpus_per_node=8 \
  hardware=h200 hardware.nproc_per_node=8 hardware.nnodes=2 hardware.global_batch=64 \
  lora.r=8,16,32,64 'lora.alpha="${mul:2,${lora.r}}"' \
  train.max_steps=1000 train.resume=auto \
  "$@"
