"""Rust evaluation during training (`eval.every_steps`) and the best step's adapter (`train.keep_best`).

Every `eval.every_steps` optimizer steps, and at the last step, the adapter being trained writes
completions for the `eval.subset` problems, which are compiled and tested exactly as in the final
evaluation (the public generate/execute functions of `sigil_exp.evaluate`). `eval/pass@1` and
`eval/compile_rate` go to W&B at that step and into metrics.json's history; the files go to
`<run>/eval/steps/step-<N>/`. The evaluation runs with its own RNG state, so training takes the same
steps with or without it.

`train.keep_best=eval/pass@1` keeps the adapter of the best step (the first to reach the best value,
as transformers' `load_best_model_at_end` does) in `<run>/checkpoints/best/`; when training ends it is
loaded back into the model, so `<run>/adapter/`, the final eval loss and the final Rust evaluation are
the best step's, and metrics.json records `best/step` and `best/<metric>`. The last step's adapter stays
in `checkpoints/checkpoint-<last>`. A sweep optimises the best value with
`sweep.objective=best/eval/pass@1 sweep.direction=maximize`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sigil_exp.config import RunConfig, SigilError
from sigil_exp.distributed import barrier, is_main
from sigil_exp.evaluate import (
    execute_completions,
    find_toolchain,
    gen_config,
    generate_completions,
    load_problems,
    write_completions,
)
from sigil_exp.evaluate.problems import Problem
from sigil_exp.evaluate.sandbox import detect_sandbox
from sigil_exp.preflight import allocation_cap_gb

log = logging.getLogger(__name__)

BEST_DIR = "best"  # under <run>/checkpoints/; not a checkpoint-N folder, so resume and rotation ignore it


def select_problems(cfg: RunConfig) -> list[Problem]:
    """The problems of the in-training evaluation: eval.subset = null (those of the final evaluation),
    N (the first N) or a list of task ids (in that order)."""
    ev = cfg.eval
    sub = ev.subset
    if sub is None:
        return load_problems(ev.problems, ev.limit)
    if isinstance(sub, int):
        return load_problems(ev.problems, sub)
    by_id = {p.task_id: p for p in load_problems(ev.problems)}
    unknown = [t for t in sub if t not in by_id]
    if unknown:
        raise SigilError(f"eval.subset names {', '.join(map(str, unknown))}, not in {ev.problems}; "
                         f"use task ids of that file (e.g. {next(iter(by_id))}) or a number of problems.")
    return [by_id[t] for t in sub]


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.count("/") == 1 and (k == "eval/compile_rate" or k.startswith("eval/pass@"))}


class InTrainingEval(TrainerCallback):
    """Evaluates the model every `eval.every_steps` steps and at the last; tracks the best step."""

    def __init__(self, cfg: RunConfig, tokenizer: Any, run_dir: Path, wandb_run=None,
                 history: list[dict[str, Any]] | None = None):
        self.cfg, self.tokenizer, self.run_dir, self.run = cfg, tokenizer, Path(run_dir), wandb_run
        self.history = history if history is not None else []
        self.problems = select_problems(cfg)  # bad subsets, rustc or sandbox fail before training starts
        self.toolchain = find_toolchain()
        self.sandbox = detect_sandbox(cfg.eval.sandbox)
        self.metric = cfg.train.keep_best
        self.best_dir = self.run_dir / "checkpoints" / BEST_DIR
        self.best: dict[str, Any] | None = None
        if self.metric and cfg.train.resume and (self.best_dir / "best.json").is_file():
            self.best = json.loads((self.best_dir / "best.json").read_text())  # a resumed run keeps its best
        self.done: set[int] = set()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        every = self.cfg.eval.every_steps
        if not is_main():  # data parallel: rank 0 evaluates and keeps the best; the others wait at the next step
            return
        if model is not None and step not in self.done and (step % every == 0 or step >= state.max_steps):
            self.evaluate(model, step)

    def evaluate(self, model: Any, step: int) -> dict[str, float]:
        import torch

        self.done.add(step)
        out = self.run_dir / "eval" / "steps" / f"step-{step}"
        was_training, padding_side = model.training, getattr(self.tokenizer, "padding_side", "right")
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices):  # sampling seeds must not reseed training's dropout
                completions = generate_completions(model, self.tokenizer, self.problems,
                                                   gen_config(self.cfg.eval, self.cfg.data.format,
                                                              allocation_cap_gb(self.cfg.hardware)))
        finally:
            model.train(was_training)
            self.tokenizer.padding_side = padding_side
        write_completions(out / "completions.jsonl", completions)
        metrics = execute_completions(completions, self.cfg.eval, out, sandbox=self.sandbox, toolchain=self.toolchain,
                                      extra={"step": step, "format": self.cfg.data.format})
        row = {**_headline(metrics), "train/global_step": step}
        self.history.append(row)
        if self.run is not None:
            self.run.log(row, step=step)
        log.info("step %d: in-training evaluation on %d problems: %s", step, len(self.problems),
                 ", ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith("eval/")))
        if self.metric:
            self._track_best(model, step, row.get(self.metric, 0.0))
        return metrics

    def _track_best(self, model: Any, step: int, value: float) -> None:
        if self.best is not None and not value > self.best["value"]:
            return
        tmp = self.best_dir.with_name(BEST_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        self.best = {"step": step, "metric": self.metric, "value": value}
        (tmp / "best.json").write_text(json.dumps(self.best) + "\n")
        shutil.rmtree(self.best_dir, ignore_errors=True)
        tmp.rename(self.best_dir)
        log.info("step %d: new best %s=%.3f (adapter kept in %s)", step, self.metric, value, self.best_dir)

    def restore_best(self, model: Any) -> dict[str, Any]:
        """Load the best step's adapter weights into `model` (train.keep_best); its facts for metrics.json.
        Every rank of a data-parallel run loads what rank 0 kept, so the final eval loss is the best step's."""
        if not self.metric:
            return {}
        barrier()
        if self.best is None and (self.best_dir / "best.json").is_file():
            self.best = json.loads((self.best_dir / "best.json").read_text())
        if self.best is None:
            return {}
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(self.best_dir / "adapter_model.safetensors"))
        device = next(p.device for p in model.parameters() if p.requires_grad)
        set_peft_model_state_dict(model, {k: v.to(device) for k, v in state.items()})
        log.info("train.keep_best=%s: the adapter of step %d (%s=%.3f) is the run's adapter; the last step's "
                 "stays in %s", self.metric, self.best["step"], self.metric, self.best["value"],
                 self.run_dir / "checkpoints")
        return {"best/step": self.best["step"], f"best/{self.metric}": self.best["value"]}


def in_training_eval(cfg: RunConfig, tokenizer: Any, run_dir: Path, wandb_run=None,
                     history: list[dict[str, Any]] | None = None) -> InTrainingEval | None:
    """The callback for `eval.every_steps > 0`, else None."""
    if cfg.eval.every_steps <= 0:
        return None
    return InTrainingEval(cfg, tokenizer, run_dir, wandb_run, history)
