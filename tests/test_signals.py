"""Ctrl-C and SIGTERM: the first stops at a step boundary with a checkpoint, the second aborts; the run is
marked interrupted, one line says how to resume, the exit code says which signal. Real signals."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from sigil_exp import rundir
from sigil_exp.signals import STOP, RunInterrupted, graceful, hand_back, handled
from sigil_exp.tracking import read_offline_run
from tests.conftest import ROOT


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # Python runs the handler at the next bytecode; make sure it has


def test_first_signal_asks_for_a_stop_and_a_second_aborts():
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN in a shell's background job
    with pytest.raises(RunInterrupted) as e, graceful() as stop:
        _deliver(signal.SIGINT)
        assert stop.signum == signal.SIGINT  # training goes on to the end of its step
        _deliver(signal.SIGINT)
    assert e.value.signum == signal.SIGINT and e.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before and not STOP.graceful  # the handler it found is back


def test_outside_training_a_signal_aborts_at_once_with_its_exit_code():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as e, handled():
        _deliver(signal.SIGTERM)
    assert e.value.exit_code == 143 and "stopped by SIGTERM without a final save" in str(e.value)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_launchers_preemption_signal_is_handed_back_after_the_stop():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # as submitit installs it
    try:
        with pytest.raises(RunInterrupted) as e, handled():
            with graceful() as stop:
                _deliver(signal.SIGUSR2)
                assert stop.signum == signal.SIGUSR2 and not calls  # ours first: stop and save
            raise RunInterrupted(stop.signum, step=3, checkpoint="checkpoint-3", recorded=True)
        hand_back(e.value)
        assert calls == [signal.SIGUSR2]  # then the launcher's hook (submitit requeues the job)
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _env(cache_dir: str) -> dict[str, str]:
    return {**os.environ, "SIGIL_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}


def _files(run_dir):
    """Every file of the run folder with its modification time (but the log, the lock and Hydra's .hydra/)."""
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and p.name not in ("run.log", ".lock") and ".hydra" not in p.parts}


@pytest.mark.slow  # ~50 s: three CLI runs; test_resume.py covers SIGTERM + resume in-process
def test_sigterm_saves_marks_interrupted_and_its_resume_command_finishes_the_run(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", "eval.enabled=false", "train.max_steps=16", "train.save_steps=2", "train.logging_steps=1",
            "train.eval_steps=0", "model.max_seq_len=256", "data.val_fraction=0.03", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "sigil_exp", *args], cwd=ROOT, env=_env(cache_dir), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not (run_dir / "checkpoints" / "checkpoint-2").is_dir() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sigil_exp: stopped by SIGTERM at step ") and " saved); resume with: python -m sigil_exp " in last
    first = json.loads((run_dir / "metrics.json").read_text())
    stopped_at = first["train/steps"]
    assert first["status"] == "interrupted" and first["stopped_by"] == "SIGTERM" and 2 <= stopped_at < 16
    assert (run_dir / "checkpoints" / f"checkpoint-{stopped_at}" / rundir.HISTORY).is_file()
    wb = read_offline_run(run_dir)
    assert wb["summary"]["status"] == "interrupted" and wb["exit_code"] == 143
    assert rundir.read_state(run_dir)["resume_on_restart"] is True  # a launcher restarting the job continues it

    # the printed command continues the run: one history, one W&B run, a line per row instead of raw dicts
    cmd = shlex.split(last.split("resume with: ", 1)[1])
    assert cmd[:3] == ["python", "-m", "sigil_exp"] and cmd[-2:] == [f"hydra.run.dir={run_dir}", "train.resume=auto"]
    second = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, env=_env(cache_dir), text=True, capture_output=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = [r["train/global_step"] for r in metrics["history"] if "train/loss" in r]
    assert metrics["status"] == "ok" and steps == list(range(1, 17)) and metrics["run/resumed_from_step"] == stopped_at
    wb = read_offline_run(run_dir)
    assert wb["fragments"] == 2 and wb["exit_code"] == 0 and wb["summary"]["status"] == "ok"
    assert [r["_step"] for r in wb["history"]] == list(range(1, 17))
    for text in (out + err, second.stdout + second.stderr):
        assert "{'loss'" not in text and "URL not available" not in text and "it/s]" not in text
    assert f"continuing from {run_dir}/checkpoints/checkpoint-{stopped_at}" in second.stdout
    assert "step 16/16: loss " in second.stdout

    # the same command again: the run is finished, nothing changes
    before = _files(run_dir)
    third = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, env=_env(cache_dir), text=True, capture_output=True,
                           timeout=600)
    assert third.returncode == 0 and "already finished (16 steps, status ok); nothing to do" in third.stdout
    assert _files(run_dir) == before


_POOL_SCRIPT = """
import os, signal, time
from sigil_exp.data import _pool
from sigil_exp.signals import handled

def pid(_):
    time.sleep(0.2)
    return os.getpid()

with handled():  # a run's handlers are active while it builds its data
    with _pool(2, {}) as pmap:
        pids = set(pmap(pid, range(4)))
        for p in pids:
            os.kill(p, signal.SIGINT)  # Ctrl-C reaches the whole process group
        time.sleep(0.3)
        print("alive after SIGINT", all(os.waitpid(p, os.WNOHANG) == (0, 0) for p in pids))
        for p in pids:
            os.kill(p, signal.SIGTERM)  # a launcher stopping the group
        time.sleep(0.3)
        print("work goes on", sorted(pmap(abs, [-1, -2])))
"""


def test_data_workers_leave_signals_to_the_run():
    """The data pool's forked workers do not inherit the run's handlers: Ctrl-C is the parent's to handle and
    SIGTERM ends a worker quietly, so an interrupted or failing multi-rank run prints no worker tracebacks."""
    p = subprocess.run([sys.executable, "-c", _POOL_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "alive after SIGINT True" in p.stdout and "work goes on [1, 2]" in p.stdout, p.stdout
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
