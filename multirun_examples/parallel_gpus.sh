#!/usr/bin/env bash
# Question: the rank sweep again, but N jobs at once on one machine with N GPUs (one GPU per job).
# Cost: 4 jobs x 500 steps, in ceil(4 / N) rounds of N parallel jobs.
# Command (NGPUS defaults to the GPUs nvidia-smi lists):
#   bash multirun_examples/parallel_gpus.sh
# Smoke form (tiny model on CPU: two processes at once, "GPUs" 0 and 1 assigned but unused, ~40 s on 2 cores):
#   NGPUS=2 bash multirun_examples/parallel_gpus.sh experiment=smoke train.max_steps=3 train.logging_steps=1 eval.enabled=false lora.r=4,8
# How: hydra/launcher=local_gpus runs each job in its own process (submitit's local executor) with
# CUDA_VISIBLE_DEVICES=0..N-1; sweep.one_gpu_per_job=true makes job k keep only GPU k mod N; the
# sweeper launches N jobs per batch (the local executor starts a whole batch at once). Separate
# processes also give each job its own peak-memory numbers and a clean CUDA context after an OOM.
set -euo pipefail
NGPUS=${NGPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$NGPUS" -lt 1 ]; then echo "no GPU found; set NGPUS" >&2; exit 2; fi
${PYTHON:-python} -m sigil_exp -m \
  hydra/launcher=local_gpus hydra.launcher.gpus_per_node="$NGPUS" hydra.sweeper.max_batch_size="$NGPUS" \
  sweep.one_gpu_per_job=true \
  lora.r=8,16,32,64 'lora.alpha="${mul:2,${lora.r}}"' \
  train.max_steps=500 \
  "$@"
