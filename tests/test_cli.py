"""`python -m sigil_exp` as a user runs it: clear one-sentence failures, multirun isolation, resume."""

from __future__ import annotations

import json

import yaml

from sigil_exp.tracking import read_offline_run
from tests.conftest import run_cli


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


def test_resume_auto_continues_from_the_last_checkpoint(cache_dir, tmp_path):
    common = ["experiment=smoke", "train.eval_steps=0", "train.save_steps=2", "train.logging_steps=1", "eval.enabled=false",
              f"hydra.run.dir={tmp_path}", "wandb.mode=disabled"]
    first = run_cli([*common, "train.max_steps=4"], cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli([*common, "train.max_steps=6", "train.resume=auto"], cache_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    steps = [h["train/global_step"] for h in metrics["history"] if "train/loss" in h]
    assert metrics["train/steps"] == 6 and min(steps) == 5, steps  # steps 1-4 were not redone
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert yaml.safe_load((tmp_path / "resolved_config.yaml").read_text())["train"]["resume"] == "auto"
