"""The sweep report on hand-made sweep folders: sorting by the objective in either direction,
failed, killed and running jobs, optional eval-rate columns, plots, CSV, the CLI. No training, seconds."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest
import yaml

from sigil_exp import report
from sigil_exp.tracking import objective_value, read_offline_run, swept_keys


def make_job(sweep: Path, num: int, overrides: list[str], metrics: dict | None, device: str = "cpu") -> Path:
    d = sweep / f"{num}_{'_'.join(o.replace('/', '-') for o in overrides)}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    cfg = {"lora": {"r": int(overrides[0].split("=")[1]), "alpha": 32.0}, "hardware": {"device": device},
           "sweep": {"objective": "eval/loss", "direction": "minimize"}}
    (d / "resolved_config.yaml").write_text(yaml.safe_dump(cfg))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def ok_metrics(eval_loss: float, pass1: float | None = None, **extra) -> dict:
    history = [{"train/loss": 3.0 - 0.1 * s, "train/global_step": s} for s in range(1, 6)]
    history.append({"eval/loss": eval_loss, "train/global_step": 5})
    m = {"status": "ok", "name": f"job-{eval_loss}", "train/loss": 2.5, "eval/loss": eval_loss,
         "params/trainable": 1000, "train/tokens_per_s": 1234.5, "sys/peak_mem_gb": 1.5, "time/wall_s": 10.0,
         "history": history, **extra}
    if pass1 is not None:
        m["eval/pass@1"] = pass1
        m["eval/compile_rate"] = pass1 + 0.2
    return m


@pytest.fixture
def sweep(tmp_path) -> Path:
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "overrides": {"task": ["experiment=smoke", "lora.r=8,16,32,64", "lora.alpha='${mul:2,${lora.r}}'"]},
        "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}}}))
    make_job(tmp_path, 0, ["lora.r=8", "experiment=smoke"], ok_metrics(2.0, pass1=0.10))
    make_job(tmp_path, 1, ["lora.r=16", "experiment=smoke"], ok_metrics(1.5, pass1=0.30))
    make_job(tmp_path, 2, ["lora.r=32", "experiment=smoke"],
             {"status": "failed", "error": "OutOfMemoryError: CUDA out of memory", "time/wall_s": 3.0})
    make_job(tmp_path, 3, ["lora.r=64", "experiment=smoke"], None)  # killed: no metrics.json at all
    return tmp_path


def test_report_sorts_by_objective_and_lists_failures(sweep):
    out = report.write_report(sweep)
    md = out["markdown"].read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| #")]
    assert len(rows) == 4
    assert rows[0].startswith("| 1 | 1 |") and rows[1].startswith("| 2 | 0 |")  # eval/loss 1.5 before 2.0
    assert "**failed**" in rows[2] and "**killed**" in rows[3]
    assert "4 jobs: 2 ok, 1 failed, 1 killed" in md and "Swept: `lora.r`" in md
    assert rows[3].count("| — |") >= 5  # no numbers: a dash, never an empty cell or a raw value
    assert "Same in every job: `experiment=smoke`" in md
    failed = md.split("## Jobs that did not finish")[1]
    assert "CUDA out of memory" in failed and "no metrics.json" in failed
    assert "| pass@1 |" in md.splitlines()[md.splitlines().index(rows[0]) - 2]  # eval rates shown when present
    assert "peak RSS" in md  # CPU + sequential launcher: the caveat is stated
    for png in out["plots"]:
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in out["plots"]} == {"loss_curves.png", "objective_vs_lora.r.png"}
    with out["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert [r["job"] for r in table] == ["1", "0", "2", "3"]
    assert table[0]["eval/pass@1"] == "0.3" and table[0]["overrides"] == "lora.r=16 experiment=smoke"


def test_maximised_objective_flips_the_order(sweep):
    jobs, facts = report.collect(sweep, objective="eval/pass@1", direction="maximize")
    assert [j.num for j in jobs][:2] == [1, 0] and facts["direction"] == "maximize"
    jobs, _ = report.collect(sweep, objective="eval/compile_rate", direction="minimize")
    assert [j.num for j in jobs][:2] == [0, 1]


def test_report_without_eval_rates_has_no_rate_columns(tmp_path):
    make_job(tmp_path, 0, ["lora.r=8"], ok_metrics(2.0))
    make_job(tmp_path, 1, ["lora.r=16"], ok_metrics(1.0))
    md = report.write_report(tmp_path)["markdown"].read_text()
    assert "pass@1" not in md and "compile rate" not in md and "peak RSS" not in md  # no multirun.yaml: launcher unknown


def test_cli_prints_the_table(sweep, capsys):
    report.main([str(sweep)])
    out = capsys.readouterr().out
    assert "| # | job |" in out and "report.md" in out
    with pytest.raises(SystemExit):
        report.main([str(sweep / "nope")])


def test_objective_value_worst_for_failures():
    assert objective_value({"status": "ok", "eval/loss": 1.25}, "eval/loss", "minimize") == 1.25
    assert objective_value({"status": "ok", "eval/loss": None, "train/loss": 2.0}, "eval/loss", "minimize") == 2.0
    assert objective_value({"status": "failed"}, "eval/loss", "minimize") == math.inf
    assert objective_value({"status": "ok"}, "eval/pass@1", "maximize") == -math.inf
    assert objective_value({"status": "ok", "eval/loss": float("nan")}, "eval/loss", "minimize") == math.inf


def test_swept_keys_come_from_the_sweep_command(sweep):
    assert swept_keys(sweep) == ["lora.r"]  # the tied alpha is one value, not a sweep
    assert swept_keys(sweep, {"train.lr": "interval(1e-5, 1e-3)"}) == ["train.lr", "lora.r"]


def test_killed_job_is_reported_from_its_wandb_run(tmp_path):
    import wandb

    make_job(tmp_path, 0, ["lora.r=8"], ok_metrics(2.0))
    killed = make_job(tmp_path, 1, ["lora.r=64"], None)  # no metrics.json: the OOM killer struck mid-run
    run = wandb.init(mode="offline", dir=str(killed), project="t", group="sweep-x", name="r64-a16-all",
                     settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
    run.define_metric("train/loss", summary="min,last")  # as tracking.init_run does: summaries become dicts
    run.define_metric("sys/peak_mem_gb", summary="max")
    for step in (1, 2, 3):
        run.log({"train/loss": 3.0 - step / 10, "train/global_step": step, "sys/peak_mem_gb": 1.0 + step}, step=step)
    run.summary["params/trainable"] = 4096
    run.finish(exit_code=137)
    for _ in range(300):  # on a loaded machine wandb's writer process may still be flushing the file
        if read_offline_run(killed)["exit_code"] is not None:
            break
        time.sleep(0.1)
    jobs, facts = report.collect(tmp_path)
    dead = next(j for j in jobs if j.num == 1)
    assert dead.status == "killed" and dead.objective is None and dead.name == "r64-a16-all"
    assert [r["train/global_step"] for r in dead.history if "train/loss" in r] == [1, 2, 3]
    assert dead.metrics["params/trainable"] == 4096 and "no metrics.json" in dead.error
    assert dead.metrics["train/loss"] == pytest.approx(2.7) and dead.metrics["sys/peak_mem_gb"] == 4.0
    assert [j.num for j in jobs] == [0, 1]
    png = report.plot_loss_curves([dead], tmp_path / "curves.png")  # drawn from the killed job's W&B history alone
    assert png == tmp_path / "curves.png" and png.read_bytes()[:4] == b"\x89PNG"
    row = next(ln for ln in report.markdown(jobs, facts, []).splitlines() if ln.startswith("| ") and "r64-a16-all" in ln)
    assert "**killed**" in row and "2.7000" in row and "4.00" in row and "4,096" in row and "| — |" in row
    assert "{" not in row and "'last'" not in row


def test_a_job_whose_folder_is_locked_is_running(tmp_path):
    from sigil_exp import rundir

    job = make_job(tmp_path, 0, ["lora.r=8"], {"status": "interrupted", "error": "stopped by SIGTERM at step 4"})
    assert report.read_job(job).status == "interrupted"
    with rundir.locked(job):  # a resumed attempt is at work in it
        assert report.read_job(job).status == "running"
