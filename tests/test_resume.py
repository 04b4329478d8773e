"""The run folder: one writer (lock), complete checkpoints only, resume=auto continues one run (history,
W&B run), a finished run stays untouched, no silent restart over checkpoints. Real files, real trainer."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sigil_exp import rundir
from sigil_exp.config import SigilError
from sigil_exp.signals import RunInterrupted
from sigil_exp.tracking import finish_run, init_run, read_offline_run
from sigil_exp.train import train
from tests.conftest import smoke_cfg


def fake_checkpoint(root, step, files=rundir.REQUIRED, history_steps=None):
    """A checkpoint folder as the trainer leaves it (file contents do not matter to the selection)."""
    d = root / "checkpoints" / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for name in files:
        (d / name).write_text(json.dumps({"global_step": step, "max_steps": 10}) if name == "trainer_state.json" else "x")
    if history_steps is not None:
        (d / rundir.HISTORY).write_text(json.dumps([{"train/global_step": s, "train/loss": 1.0} for s in history_steps]))
    return d


def test_resume_auto_takes_the_newest_complete_checkpoint_and_says_which(cache_dir, tmp_path, caplog):
    fake_checkpoint(tmp_path, 2, history_steps=[1, 2])
    fake_checkpoint(tmp_path, 4, history_steps=[1, 2, 3, 4, 5])  # a row past the save (logged later) is not carried
    fake_checkpoint(tmp_path, 6, files=("adapter_model.safetensors", "optimizer.pt"))  # killed mid-save (old style)
    (tmp_path / "checkpoints" / rundir.STAGING / "checkpoint-8").mkdir(parents=True)  # killed mid-save (atomic)
    rundir.update_state(tmp_path, wandb={"id": "abc123", "name": "r16", "group": None, "tags": []}, attempts=1)
    with caplog.at_level(logging.INFO, logger="sigil_exp.rundir"):
        start = rundir.prepare(smoke_cfg(cache_dir, "train.resume=auto"), tmp_path)
    assert start.checkpoint == tmp_path / "checkpoints" / "checkpoint-4" and start.step == 4
    assert [r["train/global_step"] for r in start.history] == [1, 2, 3, 4]
    assert start.wandb["id"] == "abc123" and start.attempt == 2 and start.finished is None
    log = caplog.text
    assert "checkpoint-6 (no trainer_state.json, scheduler.pt" in log and "continuing from" in log and "checkpoint-4" in log
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_an_incomplete_checkpoint_named_by_path_is_refused(cache_dir, tmp_path):
    bad = fake_checkpoint(tmp_path, 6, files=("adapter_model.safetensors",))
    with pytest.raises(SigilError, match=r"lacks trainer_state.json, optimizer.pt, scheduler.pt .*train.resume=auto"):
        rundir.prepare(smoke_cfg(cache_dir, f"train.resume={bad}"), tmp_path)


def test_restart_over_checkpoints_needs_an_explicit_choice(cache_dir, tmp_path):
    fake_checkpoint(tmp_path, 2)
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "interrupted"}))
    with pytest.raises(SigilError) as e:
        rundir.prepare(smoke_cfg(cache_dir), tmp_path)
    assert "checkpoint-2" in str(e.value) and "train.resume=auto" in str(e.value) and "train.overwrite=true" in str(e.value)
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir()  # refused: nothing touched
    start = rundir.prepare(smoke_cfg(cache_dir, "train.overwrite=true"), tmp_path)
    assert start.checkpoint is None and not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.json").exists()


def test_a_finished_run_is_finished_unless_asked_for_more_steps(cache_dir, tmp_path):
    fake_checkpoint(tmp_path, 10)
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "ok", "train/steps": 10}))
    start = rundir.prepare(smoke_cfg(cache_dir, "train.resume=auto", "train.max_steps=10"), tmp_path)
    assert start.finished == {"status": "ok", "train/steps": 10} and start.checkpoint is None
    longer = rundir.prepare(smoke_cfg(cache_dir, "train.resume=auto", "train.max_steps=20"), tmp_path)
    assert longer.finished is None and longer.checkpoint.name == "checkpoint-10" and not longer.past_end(20)
    assert rundir.Start(checkpoint=longer.checkpoint, step=10).past_end(10)  # killed after its final save


def test_a_second_writer_is_refused_and_kill_9_frees_the_folder(tmp_path):
    with rundir.locked(tmp_path):
        assert rundir.is_locked(tmp_path)
        with pytest.raises(SigilError) as e, rundir.locked(tmp_path):
            pass
    msg = str(e.value)
    assert msg.startswith(f"Run folder {tmp_path} is in use by pid ") and "hydra.run.dir=" in msg and "\n" not in msg
    assert not rundir.is_locked(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, pathlib; from sigil_exp import rundir\n"
                               f"with rundir.locked(pathlib.Path({str(tmp_path)!r})):\n print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held" and rundir.is_locked(tmp_path)
    holder.kill()  # SIGKILL: no cleanup code runs; the kernel drops the lock
    holder.wait()
    assert not rundir.is_locked(tmp_path)


def test_checkpoints_are_complete_and_carry_their_history(tiny_run):
    d = tiny_run["dir"] / "checkpoints"
    assert not (d / rundir.STAGING).exists() and not (d / "README.md").exists()  # no staging left, no hub card
    for ckpt in sorted(d.glob("checkpoint-*")):
        assert rundir.missing_files(ckpt) == []
        steps = [r["train/global_step"] for r in json.loads((ckpt / rundir.HISTORY).read_text())]
        assert steps and max(steps) == rundir.checkpoint_step(ckpt)
        assert steps == [r["train/global_step"] for r in tiny_run["metrics"]["history"]][:len(steps)]


def _attempt(cfg, run_dir):
    """One attempt as `python -m sigil_exp` makes it: prepare, W&B run (resumed by id), train, finish."""
    from omegaconf import OmegaConf

    start = rundir.prepare(cfg, run_dir)
    wb = start.wandb or {"name": "drill", "group": None, "tags": []}
    run = init_run(cfg, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)), name=wb["name"], group=None,
                   tags=[], run_id=wb.get("id"))
    rundir.update_state(run_dir, wandb={**wb, "id": run.id}, attempts=start.attempt)
    status = "failed"
    try:
        metrics = train(cfg, run_dir, run, start=start)
        status = "ok"
        return metrics
    except RunInterrupted:
        status = "interrupted"
        raise
    finally:
        finish_run(run, status=status)


class SignalAtStep(logging.Handler):
    """Sends this process a real SIGTERM when the progress line of `step` is logged (mid-training)."""

    def __init__(self, step: int):
        super().__init__()
        self.mark = f"step {step}/"

    def emit(self, record):
        if record.getMessage().startswith(self.mark):
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_then_resume_gives_the_same_adapter_and_one_history(cache_dir, tmp_path):
    common = ["train.max_steps=8", "train.save_steps=3", "train.logging_steps=1", "train.eval_steps=0",
              "model.max_seq_len=256", "data.val_fraction=0.03", "eval.enabled=false"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    baseline = _attempt(smoke_cfg(cache_dir, *common), whole)

    logger, handler = logging.getLogger("sigil_exp.train"), SignalAtStep(5)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(RunInterrupted) as e:
            _attempt(smoke_cfg(cache_dir, *common), stopped)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert e.value.signum == signal.SIGTERM and e.value.step == 6 and e.value.exit_code == 143  # the step in flight ends
    first = json.loads((stopped / "metrics.json").read_text())
    assert first["status"] == "interrupted" and first["stopped_by"] == "SIGTERM" and first["train/steps"] == 6
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert read_offline_run(stopped)["summary"]["status"] == "interrupted"

    resumed = _attempt(smoke_cfg(cache_dir, *common, "train.resume=auto"), stopped)
    assert resumed["run/resumed_from_step"] == 6 and resumed["train/steps"] == 8 and resumed["run/attempt"] == 2
    assert [r["train/global_step"] for r in resumed["history"]] == [r["train/global_step"] for r in baseline["history"]]
    assert resumed["train/loss_first"] == baseline["train/loss_first"]
    assert resumed["train/mean_loss"] == pytest.approx(baseline["train/mean_loss"], rel=1e-3)
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (whole, stopped))
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm() / torch.cat([a[k].flatten() for k in a]).norm()
    assert float(diff) < 1e-3, float(diff)

    run = read_offline_run(stopped)  # one W&B run in two fragments, each step once
    assert run["fragments"] == 2 and run["exit_code"] == 0 and run["summary"]["status"] == "ok"
    assert run["run"]["id"] == rundir.read_state(stopped)["wandb"]["id"]
    steps = [r["_step"] for r in run["history"]]
    assert steps == list(range(1, 9)), steps
