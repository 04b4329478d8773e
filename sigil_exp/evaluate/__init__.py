"""Evaluation: does the adapter write Rust that compiles and passes tests?

    problems (HumanEval-Rust JSONL) -> generate (batched, brace stop) -> completions.jsonl
        -> execute (sandboxed rustc --test + test run; batched crates) -> results.jsonl
        -> metrics (compile rate, pass@k, per category, error codes) -> metrics.json + W&B

`run_evaluation(cfg, model, tokenizer, out_dir)` is what the trainer calls;
`python -m sigil_exp.evaluate <run or adapter folder>` is the CLI (see README.md here).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sigil_exp.config import EvalConfig, RunConfig, SigilError
from sigil_exp.evaluate.execute import (
    ExecConfig,
    ProblemFailure,
    Result,
    Sample,
    check_problems,
    execute,
    find_toolchain,
)
from sigil_exp.evaluate.generate import (
    WEIGHTS,
    Completion,
    GenConfig,
    generate_completions,
    read_completions,
    write_completions,
)
from sigil_exp.evaluate.metrics import compute_metrics, error_histogram
from sigil_exp.evaluate.problems import Problem, load_problems
from sigil_exp.evaluate.sandbox import check_root_compile, detect_sandbox
from sigil_exp.preflight import allocation_cap_gb

__all__ = ["run_evaluation", "check_eval_setup", "execute_completions", "check_problems", "load_problems", "ProblemFailure",
           "Problem", "Result", "Sample", "Completion", "compute_metrics", "exec_config", "gen_config",
           "generate_completions", "read_completions", "write_completions", "find_toolchain"]

log = logging.getLogger(__name__)
TABLE_COLUMNS = ["task", "category", "completion", "verdict", "error"]


def exec_config(ev: EvalConfig) -> ExecConfig:
    for key in ("run_mem_mb", "run_threads", "run_output_mb", "run_disk_mb"):
        if getattr(ev, key) < 1:
            raise SigilError(f"eval.{key}={getattr(ev, key)} must be a positive integer; the default is "
                             f"{getattr(EvalConfig, key)}.")
    return ExecConfig(edition=ev.edition, timeout_s=ev.timeout_s, compile_timeout_s=ev.compile_timeout_s,
                      workers=ev.workers, batch_size=ev.crate_size, clippy=ev.clippy, run_mem_mb=ev.run_mem_mb,
                      run_threads=ev.run_threads, run_output_mb=ev.run_output_mb, run_disk_mb=ev.run_disk_mb,
                      run_cpu_s=ev.run_cpu_s, allow_root=ev.sandbox_allow_root)


def gen_config(ev: EvalConfig, fmt: str, memory_gb: float | None = None) -> GenConfig:
    """The generation settings of `eval.*` (`memory_gb`: the run's `allocation_cap_gb`); a bad
    eval.batch_size / eval.weights is one sentence."""
    batch = ev.batch_size
    if batch != "auto" and not (isinstance(batch, int) and not isinstance(batch, bool) and batch > 0):
        raise SigilError(f"eval.batch_size={batch!r} must be auto or a positive integer (a cap on rows per batch).")
    if ev.weights not in WEIGHTS:
        raise SigilError(f"eval.weights={ev.weights!r} must be one of {', '.join(WEIGHTS)} "
                         "(what generation multiplies by).")
    return GenConfig(fmt=fmt, n_samples=ev.n_samples, temperature=ev.temperature, top_p=ev.top_p,
                     max_new_tokens=ev.max_new_tokens, batch_size=0 if batch == "auto" else batch, seed=ev.seed,
                     weights=ev.weights, engine="static" if ev.compile else "sigil", memory_gb=memory_gb)


def check_eval_setup(cfg: RunConfig) -> None:
    """Fail before training, not after: the problems load, rustc is there, the sandbox starts
    (for the evaluation after training and for the one during it, eval.every_steps)."""
    if not cfg.eval.enabled and cfg.eval.every_steps <= 0:
        return
    load_problems(cfg.eval.problems, cfg.eval.limit)
    if cfg.eval.every_steps > 0:
        from sigil_exp.evaluate.during_training import select_problems

        select_problems(cfg)  # eval.subset names problems of eval.problems
    gen_config(cfg.eval, cfg.data.format)  # eval.batch_size / eval.weights
    if cfg.eval.generate_only:
        if cfg.eval.every_steps > 0:
            raise SigilError("eval.every_steps scores checkpoints by running their Rust, which eval.generate_only=true "
                             "skips; set eval.every_steps=0 or eval.generate_only=false.")
    else:
        find_toolchain()
        check_root_compile(detect_sandbox(cfg.eval.sandbox), cfg.eval.sandbox_allow_root)  # rustc as root: refused now
    if cfg.data.format not in ("completion", "chat", "text"):
        raise SigilError(f"data.format={cfg.data.format!r} cannot be evaluated; set eval.enabled=false.")


def run_evaluation(cfg: RunConfig, model: Any, tokenizer: Any, out_dir: Path) -> dict[str, float]:
    """Generate, save completions, execute, write results + metrics, log to W&B; flat metrics back.
    eval.generate_only: stop after eval/completions.jsonl and eval/generation.json (a GPU box without
    Rust; `python -m sigil_exp.evaluate --completions` executes them where rustc is)."""
    ev = cfg.eval
    generate_only = ev.generate_only
    problems = load_problems(ev.problems, ev.limit)
    if not generate_only:
        toolchain = find_toolchain()  # fail before spending time on generation
        sandbox = detect_sandbox(ev.sandbox)
    eval_dir = Path(out_dir) / "eval"
    t0 = time.perf_counter()
    padding_side = getattr(tokenizer, "padding_side", "right")
    try:
        completions = generate_completions(model, tokenizer, problems,
                                           gen_config(ev, cfg.data.format, allocation_cap_gb(cfg.hardware)))
    finally:
        tokenizer.padding_side = padding_side
    gen_s = time.perf_counter() - t0
    new_tokens = sum(c.gen_tokens for c in completions if ev.temperature > 0 or c.sample_idx == 0)  # greedy: copies
    generation = {"generation_s": round(gen_s, 2), "gen_new_tokens": new_tokens,
                  "gen_tokens_per_s": round(new_tokens / max(gen_s, 1e-9), 1), "format": cfg.data.format}
    write_completions(eval_dir / "completions.jsonl", completions)
    if generate_only:
        for stale in ("results.jsonl", "metrics.json"):  # an earlier evaluation's verdicts on other completions
            (eval_dir / stale).unlink(missing_ok=True)
        (eval_dir / "generation.json").write_text(json.dumps(generation, indent=2) + "\n")
        metrics = {"eval/gen_tokens_per_s": generation["gen_tokens_per_s"]}
        _log_generation(metrics)
        return metrics
    metrics = execute_completions(completions, ev, eval_dir, sandbox=sandbox, toolchain=toolchain, extra=generation,
                                  extra_metrics={"eval/gen_tokens_per_s": generation["gen_tokens_per_s"]})  # W&B too
    log_to_wandb(metrics, eval_dir)
    return metrics


def execute_completions(completions: list[Completion], ev: EvalConfig, eval_dir: Path, *, sandbox=None,
                        toolchain=None, extra: dict[str, Any] | None = None,
                        extra_metrics: dict[str, float] | None = None) -> dict[str, float]:
    """Execute saved completions; write results.jsonl and metrics.json into `eval_dir` (`extra` at its
    top level, `extra_metrics` beside the pass rates)."""
    sandbox = sandbox or detect_sandbox(ev.sandbox)
    samples = [Sample(task_id=c.task_id, category=c.category, prompt=c.prompt, completion=c.completion, test=c.test,
                      sample_idx=c.sample_idx) for c in completions]
    t0 = time.perf_counter()
    results = execute(samples, exec_config(ev), sandbox, toolchain, progress=log.info)
    exec_s = time.perf_counter() - t0
    eval_dir.mkdir(parents=True, exist_ok=True)
    with (eval_dir / "results.jsonl").open("w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    metrics = {**compute_metrics(results), **(extra_metrics or {})}
    summary = {
        "metrics": metrics, "error_codes": error_histogram(results), "sandbox": sandbox.describe(),
        "execution_s": round(exec_s, 2), "samples_per_min": round(len(results) / max(exec_s, 1e-9) * 60, 1),
        "eval_config": asdict(ev), **(extra or {}),
    }
    (eval_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("eval: %d samples, compile_rate %.3f, pass@1 %.3f (sandbox %s, %.1fs)", len(results),
             metrics.get("eval/compile_rate", 0.0), metrics.get("eval/pass@1", 0.0), sandbox.describe(), exec_s)
    return metrics


def _active_wandb():
    try:
        import wandb
    except ImportError:
        return None
    return wandb if wandb.run is not None else None


def _log_generation(metrics: dict[str, float]) -> None:
    """A generate-only evaluation's speed into the active W&B run, if there is one."""
    wandb = _active_wandb()
    if wandb is not None:
        wandb.log(metrics)
        for k, v in metrics.items():
            wandb.run.summary[k] = v


def log_to_wandb(metrics: dict[str, float], eval_dir: Path) -> None:
    """Metrics and an `eval/samples` table into the active W&B run, if there is one."""
    wandb = _active_wandb()
    if wandb is None:
        return
    rows = []
    with (eval_dir / "results.jsonl").open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            error = ", ".join(r["error_codes"]) or r["stderr"][:300]
            rows.append([r["task_id"], r["category"], r["completion"], r["verdict"], error])
    wandb.log({**metrics, "eval/samples": wandb.Table(columns=TABLE_COLUMNS, data=rows)})
    for k, v in metrics.items():
        wandb.run.summary[k] = v
