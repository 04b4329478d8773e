"""A run folder whose adapter has learned a few bundled problems: the loop-closing run.

The tiny model (experiment=smoke) is trained, through `python -m sigil_exp` as a user runs it, on the
canonical solutions of LOOP_TASKS in the training format ({prompt, gen} JSONL: prompt = the problem's
prompt, gen = its canonical solution) until it reproduces them; the run's eval.problems is those
problems, so `python -m sigil_exp.evaluate <run>` scores it (pass@1 ~1.0; the untrained base: 0).
About 40-60 s on 2 idle cores. For tests that need an adapter whose output matters (evaluate, export):

    from tests.loop_fixture import train_loop_run
    run = train_loop_run(tmp_path / "run", cache_dir)               # -> the run folder
    run = train_loop_run(tmp_path / "run", cache_dir, "data.format=chat")   # any extra override

Measured (2 cores, quant=nf4, fp32 compute): 20 steps -> pass@1 0.25, 30 -> 1.0, 40 -> 1.0 (loss 0.24),
the same in the chat and text formats; LOOP_STEPS keeps a margin over 30.
"""

from __future__ import annotations

import json
from pathlib import Path

from sigil_exp.evaluate.problems import load_problems
from tests.conftest import run_cli

# One problem per category of the bundled set, each with a short canonical solution (25-48 tokens of
# the tiny model's tokenizer, well below the smoke preset's eval.max_new_tokens=160).
LOOP_TASKS = ("SigilRust/0", "SigilRust/8", "SigilRust/19", "SigilRust/25", "SigilRust/32", "SigilRust/42",
              "SigilRust/49", "SigilRust/55")
LOOP_STEPS = 40
LOOP_OVERRIDES = [
    "experiment=smoke", "data=jsonl", "data.val_fraction=0", "data.num_proc=1",  # every problem is trained on
    f"train.max_steps={LOOP_STEPS}", "train.lr=1e-2", "train.logging_steps=5", "train.eval_steps=0",
    "train.save_steps=10",
    # fp32 compute: 3.6x faster than bf16 autocast on a CPU without AVX512-BF16, same result
    "hardware.precision=fp32", "quant.compute_dtype=float32",
    "eval.enabled=false",  # scored afterwards with `python -m sigil_exp.evaluate <run>`
]


def write_loop_data(folder: Path, tasks: tuple[str, ...] = LOOP_TASKS) -> tuple[Path, Path]:
    """(train.jsonl of {prompt, gen}, problems.jsonl) for `tasks` of the bundled problem set."""
    by_id = {p.task_id: p for p in load_problems("pkg://assets/rust_problems.jsonl")}
    problems = [by_id[t] for t in tasks]
    folder.mkdir(parents=True, exist_ok=True)
    train, probs = folder / "train.jsonl", folder / "problems.jsonl"
    train.write_text("".join(json.dumps({"prompt": p.prompt, "gen": p.canonical_solution}) + "\n" for p in problems))
    probs.write_text("".join(json.dumps(p.to_json()) + "\n" for p in problems))
    return train, probs


def train_loop_run(run_dir: Path, cache_dir: str, *overrides: str, tasks: tuple[str, ...] = LOOP_TASKS) -> Path:
    """Train the loop-closing run into `run_dir` (a subprocess `python -m sigil_exp`); returns run_dir."""
    run_dir = Path(run_dir)
    train, problems = write_loop_data(run_dir.with_name(run_dir.name + "-data"), tasks)
    proc = run_cli([*LOOP_OVERRIDES, f"data.sources.0.path={train}", f"eval.problems={problems}",
                    f"hydra.run.dir={run_dir}", *overrides], cache_dir)
    if proc.returncode != 0:
        raise RuntimeError(f"the loop-closing run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return run_dir
