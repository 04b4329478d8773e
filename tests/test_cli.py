"""`python -m sigil_exp` as a user runs it: clear one-sentence failures, multirun isolation, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from sigil_exp import rundir
from sigil_exp.config import SigilError
from sigil_exp.tracking import check_online, read_offline_run
from tests.conftest import ROOT, run_cli


def _one_sentence_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("sigil_exp: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_missing_local_model_path_is_one_sentence(cache_dir, tmp_path):
    proc = run_cli(["model.name_or_path=/nonexistent/Meta-Llama-3.1-8B", f"hydra.run.dir={tmp_path}"], cache_dir)
    msg = _one_sentence_error(proc)
    assert "/nonexistent/Meta-Llama-3.1-8B" in msg and "model.name_or_path" in msg and "make demo" in msg


def test_default_hub_model_offline_is_one_sentence(cache_dir, tmp_path):
    proc = run_cli([f"hydra.run.dir={tmp_path}"], cache_dir)
    msg = _one_sentence_error(proc)
    assert "meta-llama/Llama-3.1-8B-Instruct" in msg and "Hugging Face cache" in msg and "model.name_or_path" in msg
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_cuda_preset_on_cpu_is_one_sentence(cache_dir, tmp_path):
    proc = run_cli(["experiment=smoke", "hardware=h100", f"hydra.run.dir={tmp_path}"], cache_dir)
    msg = _one_sentence_error(proc)
    assert "hardware=h100" in msg and "CUDA" in msg and "hardware=cpu" in msg


def test_help_and_cfg_job(cache_dir):
    helped = run_cli(["--help"], cache_dir)
    assert helped.returncode == 0
    for group in ("model", "quant", "lora", "data", "hardware", "experiment"):
        assert f"{group}:" in helped.stdout
    shown = run_cli(["--cfg", "job", "lora.r=32", "lora=attn"], cache_dir)
    assert shown.returncode == 0, shown.stderr[-3000:]
    cfg = yaml.safe_load(shown.stdout)
    assert cfg["lora"]["r"] == 32 and cfg["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.slow  # ~40-70 s on 2 cores; the fast suite covers this in-process
def test_multirun_jobs_get_their_own_wandb_runs_and_adapters(cache_dir, tmp_path):
    proc = run_cli(["-m", "experiment=smoke", "lora.r=4,8", "train.max_steps=3", "train.eval_steps=0", "train.logging_steps=1", "eval.enabled=false",
                    "train.save_steps=100", f"hydra.sweep.dir={tmp_path}"], cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "adapter").is_dir())
    assert len(jobs) == 2
    ranks = [json.loads((j / "adapter" / "adapter_config.json").read_text())["r"] for j in jobs]
    assert ranks == [4, 8]
    runs = [read_offline_run(j) for j in jobs]
    assert runs[0]["run"]["id"] != runs[1]["run"]["id"]
    assert [r["config"]["lora.r"] for r in runs] == [4, 8]
    assert [r["run"]["name"] for r in runs] == ["r4-a16-all", "r8-a16-all"]
    assert runs[0]["run"]["group"] == runs[1]["run"]["group"] and runs[0]["run"]["group"].startswith("sweep-")
    assert all("sweep:lora.r" in r["run"]["tags"] for r in runs)
    for r in runs:  # each run's history holds only its own 3 steps
        steps = [h["train/global_step"] for h in r["history"] if "train/loss" in h]
        assert steps == sorted(set(steps)) and max(steps) == 3


@pytest.mark.slow  # ~40-70 s on 2 cores; the fast suite covers this in-process
def test_resume_auto_continues_from_the_last_checkpoint(cache_dir, tmp_path):
    common = ["experiment=smoke", "train.eval_steps=0", "train.save_steps=2", "train.logging_steps=1", "eval.enabled=false",
              f"hydra.run.dir={tmp_path}", "wandb.mode=disabled"]
    first = run_cli([*common, "train.max_steps=4"], cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    before = (tmp_path / "metrics.json").read_text()
    again = run_cli([*common, "train.max_steps=6"], cache_dir)  # checkpoints there, no train.resume: refused
    msg = _one_sentence_error(again)
    assert "checkpoint-4" in msg and "train.resume=auto" in msg and "train.overwrite=true" in msg
    with rundir.locked(tmp_path):  # another process at work in the folder
        busy = run_cli([*common, "train.max_steps=6", "train.resume=auto"], cache_dir)
    msg = _one_sentence_error(busy)
    assert f"Run folder {tmp_path} is in use by pid {os.getpid()}" in msg
    assert (tmp_path / "metrics.json").read_text() == before  # neither touched the run

    second = run_cli([*common, "train.max_steps=6", "train.resume=auto"], cache_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    steps = [h["train/global_step"] for h in metrics["history"] if "train/loss" in h]
    assert metrics["train/steps"] == 6 and steps == [1, 2, 3, 4, 5, 6], steps  # carried over, steps 1-4 not redone
    assert metrics["run/resumed_from_step"] == 4
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert yaml.safe_load((tmp_path / "resolved_config.yaml").read_text())["train"]["resume"] == "auto"


@pytest.mark.parametrize("override,key", [("train.lr=-1", "train.lr"), ("lora.alpha=${lora.rr}", "lora.alpha"),
                                          ("lora.target_modules=[nonexistent_proj]", "lora.target_modules")])
def test_bad_values_fail_before_any_work(cache_dir, tmp_path, override, key):
    proc = run_cli(["experiment=smoke", override, f"hydra.run.dir={tmp_path}"], cache_dir)
    msg = _one_sentence_error(proc)
    assert msg.startswith(f"sigil_exp: {key}") and msg.endswith("."), msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", ".lock", "metrics.json", "run.log"]  # no W&B, data, model
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_wandb_online_without_a_key_is_one_sentence(cache_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(HOME=str(tmp_path), SIGIL_CACHE_DIR=cache_dir, HF_HUB_OFFLINE="1", WANDB_SILENT="true")  # no key anywhere
    proc = subprocess.run([sys.executable, "-m", "sigil_exp", "experiment=smoke", "eval.enabled=false", "wandb.mode=online",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    msg = _one_sentence_error(proc)
    assert "wandb.mode=online" in msg and "wandb.mode=offline" in msg and "API key" in msg
    assert not (tmp_path / "run" / "data_stats.json").exists()  # before any data work


def test_wandb_online_without_the_server_is_one_sentence(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with pytest.raises(SigilError) as e:
        check_online("http://127.0.0.1:9")  # nothing listens there
    msg = str(e.value)
    assert "cannot be reached" in msg and "wandb.mode=offline" in msg and "\n" not in msg
