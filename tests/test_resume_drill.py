"""The kill drill (`make test-slow`): `python -m sigil_exp` killed with SIGKILL at several points, then
rerun with train.resume=auto, must end with the adapter of an uninterrupted run (within 1e-3 relative),
the same metrics.json history rows, and one W&B run holding every step once. Also: a job of a
submitit sweep that is preempted requeues itself and continues from its checkpoint.

Run with `-s` to see the drill table (drill, expected, observed)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sigil_exp.tracking import read_offline_run
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

COMMON = ["experiment=smoke", "eval.enabled=false", "train.max_steps=12", "train.save_steps=3", "train.logging_steps=1",
          "train.eval_steps=6", "train.save_total_limit=10", "model.max_seq_len=256", "data.val_fraction=0.03"]


def _log_has(pattern: str):
    return lambda d: (d / "run.log").is_file() and re.search(pattern, (d / "run.log").read_text()) is not None


# (drill, the moment of the kill)
DRILLS = [
    ("kill -9 before the first checkpoint", _log_has(r"step 2/12: loss")),
    ("kill -9 after step 7 (last checkpoint: step 6)", _log_has(r"step 7/12: loss")),
    ("kill -9 during the save of checkpoint-6", lambda d: (d / "checkpoints" / ".partial" / "checkpoint-6").is_dir()),
    ("kill -9 after the final checkpoint", lambda d: (d / "checkpoints" / "checkpoint-12").is_dir()),
]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    return float(diff / torch.cat([a[k].flatten() for k in a]).norm())


def _kill_when(run_dir: Path, moment, cache_dir: str) -> tuple[int, str]:
    env = {**os.environ, "SIGIL_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "sigil_exp", *COMMON, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not moment(run_dir):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    rc = proc.wait()
    ckpts = run_dir / "checkpoints"
    left = sorted(str(p.relative_to(ckpts)) for p in [*ckpts.glob("checkpoint-*"), *ckpts.glob(".partial/*")]) \
        if ckpts.is_dir() else []
    return rc, "left " + (", ".join(left) or "no checkpoint")


@pytest.fixture(scope="module")
def baseline(cache_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("drill") / "uninterrupted"
    proc = run_cli([*COMMON, f"hydra.run.dir={d}"], cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


TABLE: list[tuple[str, str, str]] = []


@pytest.mark.parametrize("drill", range(len(DRILLS)), ids=[d[0] for d in DRILLS])
def test_kill_then_resume_auto_ends_like_an_uninterrupted_run(drill, baseline, cache_dir, tmp_path):
    name, moment = DRILLS[drill]
    run_dir = tmp_path / "run"
    rc, left = _kill_when(run_dir, moment, cache_dir)
    assert rc == -signal.SIGKILL, f"{name}: the run ended before the kill ({rc})"
    resumed = run_cli([*COMMON, f"hydra.run.dir={run_dir}", "train.resume=auto"], cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    took = re.search(r"continuing from \S*/(checkpoint-\d+)", resumed.stdout)
    base, got = (json.loads((d / "metrics.json").read_text()) for d in (baseline, run_dir))
    diff = _rel_diff(_adapter(baseline), _adapter(run_dir))
    rows = (len(got["history"]), len(base["history"]))
    steps = [r["_step"] for r in read_offline_run(run_dir)["history"]]
    TABLE.append((name, "same adapter (< 1e-3 rel.), same history rows, W&B steps 1-12 once",
                  f"{left}; resumed from {took.group(1) if took else 'step 0'}; adapter diff {diff:.1e}; "
                  f"rows {rows[0]}/{rows[1]}; W&B steps {'1-12 once' if steps == list(range(1, 13)) else steps}"))
    print("\n| drill | expected | observed |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in TABLE))
    assert got["status"] == "ok" and got["train/steps"] == 12
    assert diff < 1e-3, diff
    assert rows[0] == rows[1]
    assert [r["train/global_step"] for r in got["history"]] == [r["train/global_step"] for r in base["history"]]
    assert steps == list(range(1, 13))


def test_a_preempted_submitit_job_requeues_and_continues(cache_dir, tmp_path):
    """submitit's preemption signal (USR2) to a running job: it saves a checkpoint, hands the signal to
    submitit, which requeues it; the restarted job continues the run (no train.resume on the command)."""
    env = {**os.environ, "SIGIL_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "sigil_exp", "-m", "hydra/launcher=submitit_local", "lora.r=4",
                             *COMMON, f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while proc.poll() is None and not list(tmp_path.glob("0_*/checkpoints/checkpoint-3")):
        time.sleep(0.02)
    (job,) = tmp_path.glob("0_*")
    pid = int((job / ".lock").read_text().split()[1])  # "pid N on <host> since ..."
    os.kill(pid, signal.SIGUSR2)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["run/attempt"] == 2 and metrics["run/resumed_from_step"] >= 3
    assert [r["train/global_step"] for r in metrics["history"] if "train/loss" in r] == list(range(1, 13))
    log = (job / "run.log").read_text()
    assert "SIGUSR2: stopping after this step" in log and "has been restarted (a launcher requeue)" in log
    submitit_logs = "".join(p.read_text() for p in tmp_path.glob(".submitit/*/*_log.*"))
    assert "Requeued job" in submitit_logs
    wb = read_offline_run(job)
    assert wb["fragments"] == 2 and [r["_step"] for r in wb["history"]] == list(range(1, 13))
