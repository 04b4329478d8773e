"""One QLoRA run, top to bottom: config -> data -> model -> SFTTrainer -> adapter + metrics.

`train(cfg, run_dir)` returns the metrics dict (also written to `<run_dir>/metrics.json`) so a
sweeper can optimise any of them.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from sigil_exp import distributed, rundir
from sigil_exp import model as modeling
from sigil_exp.checks import check_run
from sigil_exp.config import RunConfig
from sigil_exp.data import build_datasets
from sigil_exp.preflight import ModelShape, preflight
from sigil_exp.sampler import use_whole_steps
from sigil_exp.signals import RunInterrupted, StopOnSignal, graceful
from sigil_exp.throughput import StepClock, dataset_lengths, measure_peak_tflops, speed_metrics
from sigil_exp.tracking import steps_logged_before

log = logging.getLogger(__name__)


def peak_memory_gb(device: str) -> float:
    """Peak GPU memory allocated (CUDA), else the process's peak RSS."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


class MetricsCallback(TrainerCallback):
    """Renames the trainer's logs to the project's metric names (`train/loss`, `eval/loss`, ...),
    adds tokens/s and peak memory, keeps the history for metrics.json and sends it to W&B.

    Each logged row's `train/window_tokens_per_s` covers the steps since the previous row; the run's
    `train/tokens_per_s` (metrics.json and the W&B summary, one number) is the steady state from
    `clock`, warm-up steps excluded."""

    def __init__(self, device: str, wandb_run=None, history: list[dict[str, Any]] | None = None, wandb_after: int = 0):
        self.device, self.run = device, wandb_run
        self.history: list[dict[str, Any]] = list(history or [])  # a resumed run carries its rows over ...
        self.wandb_after = wandb_after  # ... and W&B holds the steps up to here from its earlier attempts
        for row in self.history:  # rows W&B never got (a killed process's unflushed ones): send them once now
            if self.run is not None and row["train/global_step"] > wandb_after:
                self.run.log(row, step=row["train/global_step"])
        self.clock = StepClock(device)
        self._since = 0  # clock steps already reported in a history row

    def on_step_begin(self, args, state, control, **kw):
        self.clock.begin(state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kw):
        self.clock.end(state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs:
            return
        row: dict[str, Any] = {}
        for k, v in logs.items():
            if not isinstance(v, int | float):
                continue
            if k.startswith("eval_"):
                row[f"eval/{k[5:]}"] = v
            elif k in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"):
                row[f"train/{k[6:] if k.startswith('train_') else k}_total"] = v
            else:
                row[f"train/{k}"] = v
        if "train/loss" in row:  # the steps since the previous row, their own time only
            seconds, tokens = self.clock.window(self._since)
            if seconds > 0:
                row["train/window_tokens_per_s"] = tokens / seconds
            self._since = len(self.clock.steps)
        row["sys/peak_mem_gb"] = peak_memory_gb(self.device)
        row["train/global_step"] = state.global_step
        if "train/loss_total" in row:  # the trainer's end-of-attempt totals: a summary, not a row of the history
            if self.run is not None:
                self.run.summary.update(row)
            return
        self.history.append(row)
        if self.run is not None and state.global_step > self.wandb_after:
            self.run.log(row, step=state.global_step)
        if line := progress_line(row, state):
            log.info(line)


_SHOWN = (("train/loss", "loss", "{:.4f}"), ("eval/loss", "eval loss", "{:.4f}"), ("train/learning_rate", "lr", "{:.3g}"),
          ("train/grad_norm", "grad norm", "{:.3g}"), ("train/window_tokens_per_s", "tokens/s", "{:,.0f}"))


def progress_line(row: dict[str, Any], state) -> str:
    """One log line per logged row, e.g. `step 20/80: loss 2.3101, lr 0.000187, grad norm 0.412, tokens/s 1,234`
    (the trainer's own raw dicts are not printed)."""
    parts = [f"{name} {fmt.format(row[key])}" for key, name, fmt in _SHOWN if isinstance(row.get(key), int | float)]
    return f"step {state.global_step}/{state.max_steps}: " + ", ".join(parts) if parts else ""


def _derived_numbers(cfg: RunConfig, n_train: int) -> dict[str, Any]:
    hw = cfg.hardware
    world = distributed.world_size()
    seqs_per_step = hw.micro_batch_size * hw.grad_accum * world
    steps_per_epoch = max(1, math.ceil(n_train / seqs_per_step))
    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(steps_per_epoch * cfg.train.epochs)
    return {
        "micro_batch_size": hw.micro_batch_size,  # as used: hardware.auto_micro_batch may have chosen it
        "grad_accum": hw.grad_accum,
        "world_size": world,  # processes (GPUs) in data parallel
        "effective_batch": seqs_per_step,  # micro_batch x grad_accum x world_size sequences per optimizer step
        "max_tokens_per_step": seqs_per_step * cfg.model.max_seq_len,
        "train_examples": n_train,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps,
    }


def sft_config(cfg: RunConfig, run_dir: Path, has_eval: bool):
    from trl import SFTConfig

    hw, tr = cfg.hardware, cfg.train
    eval_every = tr.eval_steps if tr.eval_steps > 0 else None
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name: a
    # deprecated alias); earlier 5.x releases know only the old one
    ckpt = "activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__ else "gradient_checkpointing"
    args = SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        seed=tr.seed,
        data_seed=tr.seed,
        max_steps=tr.max_steps,
        num_train_epochs=tr.epochs,
        learning_rate=tr.lr,
        lr_scheduler_type=tr.scheduler,
        warmup_steps=tr.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=tr.weight_decay,
        max_grad_norm=tr.max_grad_norm,
        optim=hw.optimizer,
        per_device_train_batch_size=hw.micro_batch_size,
        per_device_eval_batch_size=hw.micro_batch_size,
        gradient_accumulation_steps=hw.grad_accum,
        **{ckpt: hw.gradient_checkpointing, f"{ckpt}_kwargs": {"use_reentrant": hw.checkpointing_reentrant}},
        bf16=hw.precision == "bf16",
        fp16=hw.precision == "fp16",
        use_cpu=hw.device == "cpu",
        dataloader_num_workers=hw.dataloader_workers,
        torch_compile=hw.torch_compile,
        max_length=cfg.model.max_seq_len,
        packing=hw.packing,  # bfd packing + padding-free per-document position ids
        completion_only_loss=True,  # honours the dataset's completion_mask (all ones for raw text)
        logging_steps=tr.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval and eval_every else "no",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=tr.save_steps,
        save_total_limit=tr.save_total_limit,
        include_num_input_tokens_seen="non_padding",  # summed over all ranks: tokens/s is the job's total
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient each step (DDP skips the graph walk)
        report_to="none",  # W&B logging is ours (MetricsCallback): names and grouping we control
        disable_tqdm=not sys.stderr.isatty(),
    )
    if distributed.world_size() == 1 and args.n_gpu > 1:
        # One process on a host with several GPUs trains on the first (the model sits there): the Trainer
        # would wrap it in nn.DataParallel, which trl refuses. hardware.nproc_per_node=N uses N GPUs (DDP).
        log.info("One process: GPU 0 of %d (hardware.nproc_per_node=%d trains on all of them)", args.n_gpu, args.n_gpu)
        args._n_gpu = 1
    return args


def train(cfg: RunConfig, run_dir: Path, wandb_run=None, start: rundir.Start | None = None,
          model_path: str | None = None) -> dict[str, Any]:
    """Run one fine-tuning job in `run_dir`; returns (and writes) its metrics.

    `start` says how this attempt begins (`rundir.prepare`, which runs here when it is not given: fresh,
    resumed, or finished already); `model_path` skips the checks when the caller has run them already."""
    from trl import SFTTrainer

    t_start = time.perf_counter()
    start = start if start is not None else rundir.prepare(cfg, run_dir)
    if start.finished is not None:
        return start.finished
    model_path = model_path or check_run(cfg)  # every value, the model's module names, device, eval setup
    if cfg.hardware.device == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    preflight(cfg, model_path)  # logs the memory estimate, picks auto micro-batch, stops if it cannot fit
    peak_tflops = measure_peak_tflops(cfg.hardware.device)  # MFU's denominator, this card now (None off CUDA)
    tokenizer = modeling.load_tokenizer(cfg.model, model_path)

    with distributed.main_first():  # rank 0 builds and caches the datasets, the other ranks read the cache
        data = build_datasets(cfg.data, tokenizer, cfg.model.max_seq_len, cfg.train.seed, cfg.cache_dir,
                              run_dir if distributed.is_main() else None)
    derived = _derived_numbers(cfg, len(data.train))
    log.info("Derived: micro-batch %(micro_batch_size)d x grad_accum %(grad_accum)d x %(world_size)d process(es) = effective batch "
             "%(effective_batch)d sequences, up to %(max_tokens_per_step)d tokens/step, "
             "%(train_examples)d train sequences before packing, %(steps_per_epoch)d steps/epoch at most, %(total_steps)d steps", derived)
    log.info("Data: %s", json.dumps(data.stats, default=str)[:2000])

    model = modeling.build_trainable_model(cfg.model, cfg.quant, cfg.lora, cfg.hardware, model_path,
                                           cfg.train.init_adapter, lora_seed=cfg.train.seed)
    trainable, total = modeling.count_parameters(model)
    log.info("Parameters: %s trainable of %s (%.3f%%), %d quantised linear layers", f"{trainable:,}", f"{total:,}",
             100 * trainable / total, modeling.quantized_linear_count(model))
    if wandb_run is not None:
        wandb_run.summary.update({"params/trainable": trainable, "params/total": total,
                                  **{f"derived/{k}": v for k, v in derived.items()},
                                  **{f"data/{k}": v for k, v in data.stats.items() if isinstance(v, int | float)}})

    from sigil_exp.evaluate.during_training import in_training_eval

    callback = MetricsCallback(cfg.hardware.device, wandb_run, history=start.history,
                               wandb_after=steps_logged_before(wandb_run))
    in_training = in_training_eval(cfg, tokenizer, run_dir, wandb_run, callback.history)  # eval.every_steps
    trainer = SFTTrainer(model=model, args=sft_config(cfg, run_dir, data.eval is not None),
                         train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                         callbacks=[callback, StopOnSignal(), *([in_training] if in_training else [])])
    _readable_output(trainer)
    use_whole_steps(trainer)  # every step a full global batch: the same rows per step on 1 GPU and on N
    rundir.save_checkpoints_atomically(trainer, history=lambda: callback.history)
    modeling.set_adapter_dtype(trainer.model, cfg.hardware.adapter_dtype)  # after trl's bf16 cast, before the optimizer
    if cfg.train.init_adapter:  # phase 2: the phase-1 adapter's exact weights, not trl's bf16 rounding of them
        modeling.load_adapter_weights(trainer.model, cfg.train.init_adapter)
    if start.past_end(cfg.train.max_steps):  # killed after its last checkpoint: nothing left to train
        rundir.restore_final_checkpoint(trainer, start.checkpoint)
        train_s = 0.0
    else:
        with graceful() as stop:  # Ctrl-C / SIGTERM: finish the step, save a checkpoint, stop
            result = trainer.train(resume_from_checkpoint=str(start.checkpoint) if start.checkpoint else None)
        if stop.signum is not None:
            step = trainer.state.global_step
            if distributed.is_main():
                write_metrics(run_dir, {"status": "interrupted", "stopped_by": signal.Signals(stop.signum).name,
                                        **_train_summary(callback.history, trainer), **callback.clock.steady(),
                                        "time/wall_s": time.perf_counter() - t_start, "history": callback.history})
            raise RunInterrupted(stop.signum, step, str(run_dir / "checkpoints" / f"checkpoint-{step}"), recorded=True)
        train_s = result.metrics.get("train_runtime")
    best = in_training.restore_best(trainer.model) if in_training else {}  # train.keep_best: the adapter below
    final_eval = _final_eval(trainer, callback.history, adapter_changed=bool(best)) if data.eval is not None else {}
    peak_gb = distributed.reduce_max(peak_memory_gb(cfg.hardware.device))  # per GPU: the largest over the ranks
    allreduce_ms = distributed.time_allreduce(trainable)  # what DDP moves per step: the LoRA gradients (fp32)
    if not distributed.is_main():  # the main process saves, evaluates and writes the run folder
        return {"status": "ok", "rank": distributed.rank()}

    adapter_dir = run_dir / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)

    speed = speed_metrics(callback.clock, ModelShape.from_model_dir(model_path), trainable, cfg.model.max_seq_len,
                          cfg.hardware.gradient_checkpointing, dataset_lengths(data.train), peak_tflops,
                          distributed.world_size())
    metrics: dict[str, Any] = {
        "status": "ok",
        **_train_summary(callback.history, trainer),
        "eval/loss": final_eval.get("eval_loss"),
        **speed,  # steady-state train/tokens_per_s, train/step_s, train/mfu (CUDA)
        "sys/peak_mem_gb": peak_gb,
        "perf/allreduce_ms": allreduce_ms,  # one all-reduce of the LoRA gradients across the ranks (None: one process)
        "params/trainable": trainable,
        "params/total": total,
        "time/train_s": train_s,  # this attempt's training time
        "run/attempt": start.attempt,
        "run/resumed_from_step": start.step if start.checkpoint else None,
        **{f"derived/{k}": v for k, v in derived.items()},
        **best,
    }
    if cfg.eval.enabled:
        from sigil_exp.evaluate import run_evaluation

        trainer.model.eval()
        metrics.update(run_evaluation(cfg, trainer.model, tokenizer, run_dir))
    metrics["time/wall_s"] = time.perf_counter() - t_start
    metrics["history"] = callback.history
    write_metrics(run_dir, metrics)
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    return metrics


def _final_eval(trainer, history: list[dict[str, Any]], adapter_changed: bool) -> dict[str, Any]:
    """The eval loss of the adapter being saved: the trainer's own evaluation at the last step when it
    ran one (eval_steps dividing max_steps) and the adapter is still that step's, else a new one."""
    last = next((r for r in reversed(history) if "eval/loss" in r), None)
    if not adapter_changed and last is not None and last.get("train/global_step") == trainer.state.global_step:
        return {"eval_loss": last["eval/loss"]}
    return trainer.evaluate()


def _train_summary(history: list[dict[str, Any]], trainer) -> dict[str, Any]:
    """Loss and speed numbers from the whole history (carried over a resume, so they cover every attempt).
    The mean loss weights each logged row by the steps it averages, as the trainer's own mean does."""
    losses = [(r["train/global_step"], r["train/loss"]) for r in history if "train/loss" in r]
    weighted, prev = 0.0, 0
    for step, loss in losses:
        weighted, prev = weighted + loss * (step - prev), step
    return {
        "train/loss": losses[-1][1] if losses else None,
        "train/loss_first": losses[0][1] if losses else None,
        "train/mean_loss": weighted / prev if prev else None,
        "train/tokens": trainer.state.num_input_tokens_seen,
        "train/steps": trainer.state.global_step,
    }


def _readable_output(trainer) -> None:
    """No raw dicts from the trainer: MetricsCallback logs a line per row. Off a terminal the trainer's
    printer goes; on a terminal its progress bar stays, without the dict it writes under the bar."""
    from transformers import PrinterCallback, ProgressCallback

    class ProgressBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            pass

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBar())


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """metrics.json, written atomically so a crash never leaves half a file."""
    rundir.write_json(run_dir / rundir.METRICS, metrics)
