"""`python -m sigil_exp [overrides]`: compose the config, run one job, always close W&B.

    python -m sigil_exp experiment=smoke            # the demo: tiny model on CPU
    python -m sigil_exp lora.r=32 lora=attn         # overrides
    python -m sigil_exp -m lora.r=8,16,32           # a sweep; each job its own W&B run
    python -m sigil_exp --cfg job                   # print the composed config
"""

from __future__ import annotations

import gc
import logging
import os
import shlex
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sigil_exp import rundir, signals
from sigil_exp.config import RunConfig, SigilError, to_object
from sigil_exp.signals import RunInterrupted
from sigil_exp.tracking import objective_value, sweep_group, swept_keys
from sigil_exp.validation import validate

log = logging.getLogger("sigil_exp")

# Hydra resolves `config_path` relative to this file: the repo's top-level conf/.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _as_typed(overrides) -> list[str]:
    """Hydra's override strings as typed: `lora.alpha=${lora.r}` stays so (iterating would resolve it)."""
    return [str(o) for o in OmegaConf.to_container(overrides, resolve=False)]


def _job_context(cfg: RunConfig) -> tuple[list[str], str | None, list[str], bool]:
    """(task overrides, W&B group, tags, is_multirun) from Hydra's runtime config."""
    hc = HydraConfig.get()
    overrides = _as_typed(hc.overrides.task)
    multirun = hc.mode == RunMode.MULTIRUN
    group = cfg.wandb.group
    if group is None and multirun:
        group = sweep_group(hc.sweep.dir)
    swept = []
    if multirun:  # only the keys the sweep varies (lora.r=8,16 or the optuna search space), not every override
        params = OmegaConf.select(hc, "sweeper.params", default=None)
        swept = swept_keys(hc.sweep.dir, OmegaConf.to_container(params) if params else None)
    tags = [*cfg.wandb.tags, cfg.experiment, cfg.model.name, f"lora-{cfg.lora.name}", *(f"sweep:{k}" for k in swept)]
    return overrides, group, tags, multirun


def run(cfg: DictConfig) -> dict[str, Any]:
    """One job: lock the run folder, check every value, decide how it starts (fresh, resumed, or finished
    already: nothing to do), then the job here, or (hardware.nproc_per_node / nnodes > 1) in worker
    processes that torch's elastic launcher starts with this resolved config (sigil_exp.launch)."""
    from sigil_exp import launch
    from sigil_exp.checks import check_run
    from sigil_exp.train import write_metrics

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with rundir.locked(run_dir):  # a second writer is refused before anything is read or written
        # Only a new folder's record (or an earlier failure's) may be replaced by this attempt's failure.
        replaceable = rundir.read_json(run_dir / rundir.METRICS).get("status") in (None, "failed")
        try:
            typed = to_object(cfg)  # `???` and interpolation errors: one sentence
            validate(typed)  # bad values: before any W&B run, data work or model load
            if typed.dry_run:
                plan = launch.plan_text(launch.rendezvous(typed.hardware, run_dir), run_dir) \
                    if launch.wants_launch(typed.hardware) else "one process"
                log.info("dry_run=true: the config composes and validates; nothing was trained. %s", plan)
                return {"status": "dry_run"}
            start = rundir.prepare(typed, run_dir)
            if start.finished is not None:
                log.info("Run in %s already finished (%s steps, status ok); nothing to do, nothing changed. To train "
                         "it further, raise train.max_steps.", run_dir, start.finished.get("train/steps"))
                return start.finished
            model_path = check_run(typed)  # the model's module names, device, adapter, eval setup (built once here)
        except BaseException as e:
            if replaceable:  # a sweep's report lists the job; a run's own record is never overwritten
                write_metrics(run_dir, {"status": "interrupted" if isinstance(e, RunInterrupted) else "failed",
                                        "error": f"{type(e).__name__}: {e}", "overrides": _as_typed(HydraConfig.get().overrides.task)})
            raise
        resolved = OmegaConf.to_container(cfg, resolve=True)
        overrides, group, tags, _ = _job_context(typed)
        job = {"overrides": overrides, "group": group, "tags": tags, "model_path": model_path}
        if launch.wants_launch(typed.hardware):
            rundir.write_config(run_dir, resolved)  # what the workers read
            return launch.launch(run_dir, typed.hardware, {**job, "start": rundir.start_to_json(start)})
        return run_job(typed, run_dir, resolved, start, **job)


def run_job(typed: RunConfig, run_dir: Path, resolved: dict[str, Any], start: rundir.Start, *,
            overrides: list[str], group: str | None, tags: list[str], model_path: str) -> dict[str, Any]:
    """The job in this process (a single run, or one worker of a multi-process run): the W&B run (main
    process only, finished in `finally`), training, metrics. Only the main process writes."""
    from sigil_exp.distributed import is_main
    from sigil_exp.tracking import finish_run, init_run, run_name, summary_metrics
    from sigil_exp.train import train, write_metrics

    t_start = time.perf_counter()
    main = is_main()
    if main:
        rundir.write_config(run_dir, resolved)
    # A resumed run keeps its W&B identity (a sweep job resumed as a single run stays in its sweep's group).
    wb = start.wandb or {"name": typed.wandb.name or run_name(typed, overrides), "group": group, "tags": tags}
    name = wb["name"]
    if main:
        rundir.update_state(run_dir, attempts=start.attempt, resume_on_restart=False)
    wandb_run, status, error, code = None, "failed", None, None
    try:
        if typed.wandb.mode != "disabled" and main:
            wandb_run = init_run(typed, run_dir, resolved, name=name, group=wb["group"], tags=wb["tags"],
                                 run_id=wb.get("id"))
            rundir.update_state(run_dir, wandb={**wb, "id": wandb_run.id})
        log.info("Run %s -> %s%s", name, run_dir, f" (attempt {start.attempt})" if start.attempt > 1 else "")
        metrics = train(typed, run_dir, wandb_run, start=start, model_path=model_path)
        status = "ok"
        if not main:
            return metrics
        metrics.update(name=name, overrides=overrides)
        write_metrics(run_dir, metrics)
        if wandb_run is not None:  # scalar columns for the run table / parallel coordinates
            wandb_run.summary.update(summary_metrics(metrics, typed.sweep.objective, typed.sweep.direction))
        _print_summary(run_dir, metrics, wandb_run)
        return metrics
    except RunInterrupted as e:
        status, error, code = "interrupted", str(e), e.exit_code
        if main and not e.recorded:  # stopped outside training: train() wrote nothing
            write_metrics(run_dir, {"status": "interrupted", "error": error, "name": name, "overrides": overrides,
                                    "time/wall_s": time.perf_counter() - t_start})
        if main:  # SIGTERM / a launcher's preemption signal: the launcher may restart this same command
            rundir.update_state(run_dir, resume_on_restart=e.signum != signal.SIGINT, stopped_by=e.name)
        raise
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        if main:  # record the failure in the run folder before anything else can go wrong
            write_metrics(run_dir, {"status": "failed", "error": error, "name": name, "overrides": overrides,
                                    "time/wall_s": time.perf_counter() - t_start})
        raise
    finally:
        finish_run(wandb_run, status=status, error=error, exit_code=code)


def _print_summary(run_dir: Path, metrics: dict[str, Any], wandb_run) -> None:
    def fmt(key: str) -> str:
        v = metrics.get(key)
        return f"{v:.4g}" if isinstance(v, int | float) else "n/a"

    lines = [
        f"Run {metrics.get('name')} finished in {fmt('time/wall_s')} s: train loss {fmt('train/loss_first')} -> "
        f"{fmt('train/loss')}, eval loss {fmt('eval/loss')}, {fmt('train/tokens_per_s')} tokens/s, "
        f"peak memory {fmt('sys/peak_mem_gb')} GB",
        f"  run folder : {run_dir}",
        f"  adapter    : {run_dir / 'adapter'}",
        f"  metrics    : {run_dir / 'metrics.json'}",
        f"  config     : {run_dir / 'resolved_config.yaml'}",
        f"  log        : {run_dir / 'run.log'}",
    ]
    if wandb_run is not None and wandb_run.settings.mode == "offline":
        offline = Path(wandb_run.settings.sync_file).parent
        fragments = sorted(offline.parent.glob(f"offline-run-*-{wandb_run.id}"))  # one per attempt of a resumed run
        push = offline if len(fragments) < 2 else offline.parent / f"offline-run-*-{wandb_run.id}"
        lines.append(f"  W&B offline: {offline}   (push: wandb sync {push})")
    log.info("\n".join(lines))


def _pin_gpu(cfg: DictConfig) -> None:
    """sweep.one_gpu_per_job: job k sees only GPU (k mod n) of the n GPUs the launcher made visible.

    Needs one process per job (hydra/launcher=submitit_local or local_gpus): CUDA reads
    CUDA_VISIBLE_DEVICES once per process, so in-process jobs could not move to another GPU."""
    hc = HydraConfig.get()
    if "submitit" not in str(OmegaConf.select(hc, "launcher._target_", default="")):
        raise SigilError("sweep.one_gpu_per_job=true needs one process per job: add hydra/launcher=local_gpus "
                         "(or submitit_local with hydra.launcher.gpus_per_node=<GPUs>).")
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        raise SigilError("sweep.one_gpu_per_job=true but no GPU is visible to the job; set "
                         "hydra.launcher.gpus_per_node=<number of GPUs on the machine>.")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(hc.job.num) % len(visible)]
    log.info("Job %s runs on GPU %s (of %s)", hc.job.num, os.environ["CUDA_VISIBLE_DEVICES"], ",".join(visible))


def _free_memory() -> None:
    """Between in-process sweep jobs on a GPU: free the last job's model and optimizer (also after an OOM)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()  # the trainer holds reference cycles; costs ~0.5 s, so only where memory is scarce
        torch.cuda.empty_cache()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    """Returns the sweep objective (`sweep.objective`) so a sweeper such as optuna can optimise it."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    objective, direction = cfg.sweep.objective, cfg.sweep.direction
    try:
        with signals.handled():  # Ctrl-C / SIGTERM: a clean stop, one line, a distinct exit code
            if multirun and cfg.sweep.one_gpu_per_job:
                _pin_gpu(cfg)
            return objective_value(run(cfg), objective, direction)
    except RunInterrupted as e:
        print(f"sigil_exp: {e}; resume with: {resume_command()}", file=sys.stderr)
        signals.hand_back(e)  # under submitit: its preemption hook requeues the job (and exits)
        sys.exit(e.exit_code)
    except SigilError as e:
        print(f"sigil_exp: {e}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        log.error("Job failed: %s", e)
    except Exception as e:
        if not multirun:
            raise
        # A sweep goes on when one job fails (OOM, bad combination, crash): the job's metrics.json
        # and W&B run record the error, the sweep report lists it, the sweeper sees the worst value.
        log.error("Job failed: %s: %s\n%s", type(e).__name__, e, traceback.format_exc())
    finally:
        if multirun:
            _free_memory()
    return objective_value({"status": "failed"}, objective, direction)


def resume_command() -> str:
    """The command that continues this run: its overrides, its folder, train.resume=auto. In a sweep run in
    this process (the basic launcher), the whole sweep: finished jobs then say so and change nothing."""
    hc = HydraConfig.get()
    drop = ("train.resume=", "train.overwrite=", "hydra.run.dir=", "hydra.sweep.dir=", "hydra.mode=", "hydra.job.")
    if hc.mode == RunMode.MULTIRUN and "BasicLauncher" in str(OmegaConf.select(hc, "launcher._target_", default="")):
        args = [a for a in sys.argv[1:] if not a.lstrip("+~").startswith(drop)]
        where = f"hydra.sweep.dir={Path(hc.sweep.dir).resolve()}"
    else:  # one run, or one job of a sweep run by submitit: continue that job's folder as a single run
        args = [o for o in _as_typed(hc.overrides.hydra) + _as_typed(hc.overrides.task) if not o.lstrip("+~").startswith(drop)
                and not o.startswith(("hydra/launcher", "hydra.launcher", "hydra/sweeper", "hydra.sweeper"))]
        where = f"hydra.run.dir={hc.runtime.output_dir}"
    return shlex.join(["python", "-m", "sigil_exp", *args, where, "train.resume=auto"])


def _quiet_progress_bars() -> None:
    """Off a terminal, progress bars are lines of carriage returns in the log: datasets', the model loader's."""
    import datasets
    import huggingface_hub
    import transformers

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes looks for an optional hub-fetched CPU kernel and falls back to its own: not news.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft 0.21 asks every model it wraps for transformers 5's deprecated alias: once per job, nothing to act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if not sys.stderr.isatty():
        _quiet_progress_bars()
    try:
        hydra_main()
    except KeyboardInterrupt:  # before the job's handlers were installed (imports, composing the config)
        print("sigil_exp: interrupted before the run started; nothing was written.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
