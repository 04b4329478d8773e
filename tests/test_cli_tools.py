"""The tool CLIs run as a user runs them (a subprocess each): `python -m sigil_exp.evaluate` on saved
completions and `--check-problems`, `.report --direction`, `.data.bench`, `.evaluate.bench`.
(`.evaluate <run folder>` runs in test_wiring.py and test_loop.py, on trained adapters.)"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sigil_exp.evaluate.problems import load_problems
from tests.conftest import ROOT

needs_rustc = pytest.mark.skipif(shutil.which("rustc") is None, reason="rustc is not installed")


def tool(module: str, *args: str, cache_dir: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", **({"SIGIL_CACHE_DIR": cache_dir} if cache_dir else {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def problems():
    return load_problems("pkg://assets/rust_problems.jsonl")[:3]


@needs_rustc
def test_evaluate_completions_without_a_model(problems, tmp_path):
    # canonical (pass), todo!() (test failure), an undefined name (E0425) for each of 3 problems
    bodies = {"pass": None, "test_failure": "    todo!()\n}\n", "compile_error": "    undefined_name\n}\n"}
    rows = [{"task_id": p.task_id, "category": p.category, "prompt": p.prompt, "test": p.test,
             "completion": body or p.canonical_solution, "sample_idx": i}
            for p in problems for i, body in enumerate(bodies.values())]
    comps = tmp_path / "completions.jsonl"
    comps.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = tool("sigil_exp.evaluate", "--completions", str(comps), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval/compile_rate=0.667" in proc.stdout and "eval/pass@1=0.333" in proc.stdout
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["verdict"] for r in results] == list(bodies) * len(problems)
    assert all("E0425" in r["error_codes"] for r in results if r["verdict"] == "compile_error")
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert saved["eval/pass@1"] == pytest.approx(1 / 3) and saved["eval/compile_rate"] == pytest.approx(2 / 3)


@needs_rustc
def test_evaluate_check_problems(problems, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(p.to_json()) + "\n" for p in problems))
    proc = tool("sigil_exp.evaluate", "--check-problems", "--problems", str(good))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"3/3 problems OK ({good})" in proc.stdout
    broken = {**problems[0].to_json(), "task_id": "broken/0", "canonical_solution": "    0\n}\n"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps(broken) + "\n")
    proc = tool("sigil_exp.evaluate", "--check-problems", "--problems", str(bad))
    assert proc.returncode == 1
    assert "FAIL broken/0" in proc.stdout and "3/4 problems OK" in proc.stdout
    assert not any(f"FAIL {p.task_id}:" in proc.stdout for p in problems)


def _job(sweep: Path, num: int, r: int, pass1: float, eval_loss: float) -> None:
    d = sweep / f"{num}_lora.r={r}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"lora.r={r}"]))
    (d / "resolved_config.yaml").write_text(yaml.safe_dump({"lora": {"r": r}, "hardware": {"device": "cpu"},
                                                             "sweep": {"objective": "eval/loss", "direction": "minimize"}}))
    (d / "metrics.json").write_text(json.dumps({
        "status": "ok", "name": f"r{r}", "eval/loss": eval_loss, "train/loss": eval_loss, "eval/pass@1": pass1,
        "eval/compile_rate": pass1, "history": [{"train/loss": eval_loss, "train/global_step": 1}]}))


def test_report_direction(tmp_path):
    for num, (r, pass1, loss) in enumerate([(8, 0.2, 1.0), (16, 0.6, 1.5), (32, 0.4, 2.0)]):
        _job(tmp_path, num, r, pass1, loss)

    def order(*args: str) -> list[str]:
        proc = tool("sigil_exp.report", str(tmp_path), *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with (tmp_path / "report.csv").open() as f:
            return [row["job"] for row in csv.DictReader(f)]

    assert order("--objective", "eval/pass@1", "--direction", "maximize") == ["1", "2", "0"]
    assert order("--objective", "eval/pass@1", "--direction", "minimize") == ["0", "2", "1"]
    assert order() == ["0", "1", "2"]  # the jobs' own sweep.objective: eval/loss, lower first
    assert "Sorted by **eval/loss**" in (tmp_path / "report.md").read_text()


def test_data_bench_on_a_small_crate_tree(cache_dir, tmp_path):
    from sigil_exp.model import resolve_model_path
    from tests.conftest import smoke_cfg

    root = tmp_path / "registry"
    for i in range(3):
        src = root / f"crate{i}-0.1.0" / "src"
        src.mkdir(parents=True)
        (src / "lib.rs").write_text(f"//! Crate {i}.\n/// Adds {i}.\npub fn add{i}(x: u32) -> u32 {{\n    x + {i}\n}}\n")
    (root / "crate0-0.1.0" / "src" / "tiny.rs").write_text("//\n")  # under data.filters.min_chars
    tokenizer = resolve_model_path(smoke_cfg(cache_dir).model)  # the tiny model's tokenizer: no BPE training
    proc = tool("sigil_exp.data.bench", str(root), "--num-proc", "1", "--tokenizer", tokenizer,
                "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["files_seen"] == 4 and result["files_kept"] == 3 and sum(result["drops"].values()) == 1
    assert result["cache_hit_second_run"] is True and result["train_tokens"] > 0


@needs_rustc
def test_evaluate_bench_agrees_with_naive(tmp_path):
    proc = tool("sigil_exp.evaluate.bench", "--limit", "3", "--per-problem", "3", "--timeout-s", "3", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["samples"] >= 9 and summary["verdict_agreement"] == f"{summary['samples']}/{summary['samples']}"
    assert summary["fast_samples_per_min"] > 0 and summary["naive_samples_per_min"] > 0
