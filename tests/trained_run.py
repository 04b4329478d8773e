"""A real run folder for the export and generation tests: `python -m sigil_exp` (CLI, as a user runs
it) trains the tiny model on the canonical solutions of the first bundled problems ({prompt, gen}
JSONL) until it reproduces them, so its adapter is far from zero and greedy decoding is confident.
Built once per pytest session (both test files share it) under pytest's base temp folder."""

from __future__ import annotations

import json
from pathlib import Path

from sigil_exp.evaluate.problems import load_problems

N_PROBLEMS = 2
OVERRIDES = ["experiment=smoke", "data=jsonl", "data.val_fraction=0", "train.max_steps=16", "train.lr=2e-2",
             "train.warmup_ratio=0", "train.logging_steps=10", "train.eval_steps=0", "train.save_steps=1000",
             "eval.enabled=false", "wandb.mode=disabled", "lora.dropout=0"]


def trained_run(root: Path, cache_dir: str) -> Path:
    from tests.conftest import run_cli

    run = root / "trained_run"
    if (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "metrics.json").is_file():
        return run
    data = root / "trained_run_data.jsonl"
    with data.open("w") as f:
        for p in load_problems("pkg://assets/rust_problems.jsonl", N_PROBLEMS):
            f.write(json.dumps({"prompt": p.prompt, "gen": p.canonical_solution}) + "\n")
    proc = run_cli([*OVERRIDES, f"data.sources.0.path={data}", f"hydra.run.dir={run}", f"cache_dir={cache_dir}"],
                   cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run
