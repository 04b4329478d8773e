"""The loop closes: training, prompt format, generation, stopping, extraction and execution fit together.

The tiny model is trained on the canonical solutions of a few bundled problems in the training format
(tests/loop_fixture.py), then `python -m sigil_exp.evaluate <run>` scores it on those problems:
pass@1 rises from 0 (the untrained base, same evaluation) to >= 0.8. A mismatch between what training
shows the model and what evaluation prompts it with (BOS, separator, chat rendering, EOS/brace stop,
extraction) keeps it at 0. About a minute per format on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sigil_exp.artifacts import load_run_config
from tests.conftest import ROOT
from tests.loop_fixture import LOOP_STEPS, LOOP_TASKS, train_loop_run


def evaluate_cli(run, cache_dir) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-m", "sigil_exp.evaluate", str(run)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "SIGIL_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((Path(run) / "eval" / "metrics.json").read_text())["metrics"]


def base_pass_rate(run, out) -> float:
    """The untrained base model through the same evaluation (the run's config, problems and format)."""
    from sigil_exp.evaluate import run_evaluation
    from sigil_exp.model import load_base_model, load_tokenizer

    cfg = load_run_config(run / "resolved_config.yaml")
    base = load_base_model(cfg.model, cfg.quant, cfg.hardware).eval()
    return run_evaluation(cfg, base, load_tokenizer(cfg.model), out)["eval/pass@1"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["completion", "chat", "text"])
def test_the_loop_closes(fmt, cache_dir, tmp_path):
    # completion also evaluates during training and keeps the best step's adapter
    extra = ["eval.every_steps=10", "train.keep_best=eval/pass@1"] if fmt == "completion" else []
    run = train_loop_run(tmp_path / "run", cache_dir, f"data.format={fmt}", *extra)
    stats = json.loads((run / "data_stats.json").read_text())["totals"]
    assert stats["train_records"] == len(LOOP_TASKS) and stats["eval_records"] == 0

    assert base_pass_rate(run, tmp_path / "base") == 0.0
    metrics = evaluate_cli(run, cache_dir)
    results = [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    print(fmt, metrics, [r["verdict"] for r in results])
    assert sorted(r["task_id"] for r in results) == sorted(LOOP_TASKS)
    assert metrics["eval/pass@1"] >= 0.8, [(r["task_id"], r["verdict"], r["stderr"][:300]) for r in results]

    if extra:
        saved = json.loads((run / "metrics.json").read_text())
        curve = {r["train/global_step"]: r["eval/pass@1"] for r in saved["history"] if "eval/pass@1" in r}
        print("eval/pass@1 over steps:", curve)
        assert sorted(curve) == list(range(10, LOOP_STEPS + 1, 10))
        assert curve[10] < 0.5 and max(curve.values()) >= 0.8
        best = max(curve.values())
        assert saved["best/step"] == min(s for s, v in curve.items() if v == best)
        assert metrics["eval/pass@1"] == pytest.approx(best)  # <run>/adapter is the best step's
