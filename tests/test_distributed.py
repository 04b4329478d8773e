"""Data parallel on the CPU (gloo): the same code path a multi-GPU run takes, through the real CLI.
The parent composes once and starts the workers with torch's elastic launcher; only rank 0 writes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, compose_cfg, run_cli

from sigil_exp.config import SigilError, to_object
from sigil_exp.preflight import apply_global_batch
from sigil_exp.validation import validate


def test_global_batch_gives_each_rank_its_share():
    cfg = to_object(compose_cfg("hardware=h200", "hardware.global_batch=16"))
    hw = cfg.hardware
    apply_global_batch(hw, 2)
    assert (hw.micro_batch_size, hw.grad_accum) == (8, 1)  # the preset's micro-batch, 8 x 1 x 2 = 16
    hw.micro_batch_size, hw.global_batch = 8, 12
    apply_global_batch(hw, 1)
    assert (hw.micro_batch_size, hw.grad_accum) == (6, 2)  # the largest divisor of 12 not above 8
    bad = to_object(compose_cfg("hardware=h200", "hardware.nproc_per_node=4", "hardware.global_batch=6"))
    with pytest.raises(SigilError, match=r"hardware.global_batch=6 must be a positive multiple of the 4 processes"):
        validate(bad)


def _steps(sampler_for, n: int, micro: int, accum: int, world: int, epochs: int) -> list[list[int]]:
    """The rows of each optimizer step over `epochs`, as the trainer's data loader hands them to `world`
    ranks (accelerate's own sharding) with `accum` micro-batches of `micro` rows per rank per step."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    loaders = [prepare_data_loader(DataLoader(list(range(n)), batch_size=micro, sampler=sampler_for(n)),
                                   num_processes=world, process_index=r, use_seedable_sampler=True, data_seed=7)
               for r in range(world)]
    steps = []
    for epoch in range(epochs):
        per_rank = []
        for loader in loaders:
            loader.set_epoch(epoch)
            per_rank.append([b.tolist() for b in loader])
        for k in range(0, len(per_rank[0]), accum):
            steps.append(sorted(row for batches in per_rank for b in batches[k:k + accum] for row in b))
    return steps


def test_every_step_holds_the_same_rows_on_one_gpu_and_on_two():
    from torch.utils.data import RandomSampler

    from sigil_exp.sampler import WholeStepSampler

    def whole(n):
        return WholeStepSampler(n, 16, seed=7)

    one, two = _steps(whole, 43, 8, 2, 1, 3), _steps(whole, 43, 8, 1, 2, 3)
    assert one == two and len(one) == 6 and all(len(s) == 16 == len(set(s)) for s in one)  # 2 full steps an epoch
    assert len({r for s in one for r in s}) > 32  # a new shuffle each epoch: the rows left over take turns
    # The trainer's own shuffle ends each epoch with a short step, which DDP pads with repeated rows:
    def shuffle(n):
        return RandomSampler(range(n))

    default_one, default_two = _steps(shuffle, 43, 8, 2, 1, 1), _steps(shuffle, 43, 8, 1, 2, 1)
    assert [len(s) for s in default_one] == [16, 16, 11] and [len(s) for s in default_two] == [16, 16, 16]
    assert WholeStepSampler(5, 16, seed=7).__len__() == 5  # fewer rows than a step: one short step, not none


def test_dry_run_prints_the_launch_plan_of_a_slurm_node(cache_dir, tmp_path, monkeypatch):
    for k, v in {"SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "77"}.items():
        monkeypatch.setenv(k, v)
    p = run_cli(["hardware=h200", "hardware.nproc_per_node=8", "hardware.nnodes=2", "dry_run=true",
                 f"hydra.run.dir={tmp_path / 'run'}"], cache_dir)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert "8 worker(s) on this node (node 1 of 2), 16 in all" in out and "c10d at gpu03:29500 (run id 77)" in out
    monkeypatch.setenv("SLURM_NNODES", "3")
    p = run_cli(["hardware=h200", "hardware.nproc_per_node=8", "hardware.nnodes=2", "dry_run=true",
                 f"hydra.run.dir={tmp_path / 'run2'}"], cache_dir)
    assert p.returncode == 2 and "hardware.nnodes=2 but this SLURM job has 3 nodes" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_two_processes_train_like_one_at_the_same_global_batch(cache_dir, tmp_path):
    from sigil_exp.tracking import read_offline_run

    # 20 packed rows: 2 steps of 8 an epoch, so step 3 starts the second epoch (where the trainer's own
    # shuffle would end the first with a short step on one process and a padded one on two)
    common = ["experiment=smoke", "hardware.global_batch=8", "data.max_examples=12", "model.max_seq_len=256",
              "train.max_steps=4", "train.logging_steps=1", "train.eval_steps=0", "eval.enabled=false",
              "lora.dropout=0"]  # dropout off: ranks draw their own masks
    two, one = tmp_path / "two", tmp_path / "one"
    p = run_cli([*common, "hardware.nproc_per_node=2", f"hydra.run.dir={two}"], cache_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    p1 = run_cli([*common, "wandb.mode=disabled", f"hydra.run.dir={one}"], cache_dir)
    assert p1.returncode == 0, p1.stderr[-3000:]
    m2, m1 = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    assert (m2["derived/world_size"], m2["derived/micro_batch_size"], m2["derived/grad_accum"]) == (2, 4, 1)
    assert (m1["derived/world_size"], m1["derived/micro_batch_size"], m1["derived/grad_accum"]) == (1, 4, 2)
    assert m2["derived/effective_batch"] == m1["derived/effective_batch"] == 8
    assert m2["train/tokens"] == m1["train/tokens"]  # both ranks' tokens counted: the job's total
    l2 = [r["train/loss"] for r in m2["history"] if "train/loss" in r]
    l1 = [r["train/loss"] for r in m1["history"] if "train/loss" in r]
    assert len(l2) == len(l1) == 4 and l2 == pytest.approx(l1, rel=1e-4)
    assert m2["perf/allreduce_ms"] > 0 and m1["perf/allreduce_ms"] is None
    # rank 0 alone wrote: one adapter, one W&B run that knows it was two processes
    assert (two / "adapter" / "adapter_model.safetensors").is_file()
    runs = list((two / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert read_offline_run(two)["summary"]["derived/world_size"] == 2


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_with_its_message(cache_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"  # found only when the workers build the data (the parent checks run earlier)
    bad.write_text('{"prompt": "fn a() {", "gen": "}"}\n{"prompt": "cut off\n')
    p = run_cli(["experiment=smoke", "hardware.nproc_per_node=2", "eval.enabled=false", "wandb.mode=disabled",
                 "data=jsonl", f"data.sources.0.path={bad}", f"hydra.run.dir={tmp_path / 'run'}"], cache_dir)
    assert p.returncode == 2, p.stderr[-2000:]
    line = [x for x in p.stderr.splitlines() if x.startswith("sigil_exp:")]
    assert line and "rank " in line[0] and "bad.jsonl:2" in line[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_sigterm_stops_every_rank_at_one_step_and_the_run_resumes(cache_dir, tmp_path):
    """SIGTERM to the launching process (what a scheduler's preemption does): every rank stops after the
    same step, the checkpoint holds both ranks' RNG states, exit 143 with the resume command; resuming
    finishes the run as one history."""
    import os

    run_dir = tmp_path / "run"
    args = ["experiment=smoke", "hardware.nproc_per_node=2", "eval.enabled=false", "wandb.mode=disabled",
            "train.max_steps=10", "train.save_steps=2", "train.logging_steps=1", "train.eval_steps=0",
            "model.max_seq_len=256", "data.val_fraction=0", "lora.dropout=0", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "SIGIL_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sigil_exp", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not (run_dir / "checkpoints" / "checkpoint-2").is_dir() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("sigil_exp: stopped by SIGTERM at step ") and "resume with: " in last, last
    m = json.loads((run_dir / "metrics.json").read_text())
    stopped = m["train/steps"]
    assert m["status"] == "interrupted" and 2 <= stopped < 10
    ckpt = run_dir / "checkpoints" / f"checkpoint-{stopped}"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    again = run_cli([*args, "train.resume=auto"], cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "ok" and m["derived/world_size"] == 2 and m["run/resumed_from_step"] == stopped
    assert [r["train/global_step"] for r in m["history"] if "train/loss" in r] == list(range(1, 11))
