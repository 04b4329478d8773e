"""`python -m sigil_exp [overrides]`: compose the config, run one job, always close W&B.

    python -m sigil_exp experiment=smoke            # the demo: tiny model on CPU
    python -m sigil_exp lora.r=32 lora=attn         # overrides
    python -m sigil_exp -m lora.r=8,16,32           # a sweep; each job its own W&B run
    python -m sigil_exp --cfg job                   # print the composed config
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from sigil_exp.config import RunConfig, SigilError, to_object, validate
from sigil_exp.tracking import objective_value, sweep_group, swept_keys

log = logging.getLogger("sigil_exp")

# Hydra resolves `config_path` relative to this file: the repo's top-level conf/.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _job_context(cfg: RunConfig) -> tuple[list[str], str | None, list[str], bool]:
    """(task overrides, W&B group, tags, is_multirun) from Hydra's runtime config."""
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
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
    """One job: typed config, run folder, then the job here or (hardware.nproc_per_node/nnodes > 1) in
    worker processes started by torch's elastic launcher, each with this resolved config."""
    from sigil_exp import launch
    from sigil_exp.tracking import run_name
    from sigil_exp.train import write_metrics

    t_start = time.perf_counter()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        typed = to_object(cfg)
    except MissingMandatoryValue as e:
        raise SigilError(f"{e.full_key} is required but not set (???); add `{e.full_key}=<value>` to the command.") from None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(OmegaConf.create(resolved), run_dir / "resolved_config.yaml")

    overrides, group, tags, multirun = _job_context(typed)
    name = typed.wandb.name or run_name(typed, overrides)
    if not launch.wants_launch(typed.hardware):
        return run_job(typed, run_dir, resolved, name=name, group=group, tags=tags, overrides=overrides)
    validate(typed)  # a bad value fails here, once, not in every worker
    if typed.dry_run:
        log.info(launch.plan_text(launch.rendezvous(typed.hardware, run_dir), run_dir))
        return {"status": "dry_run"}
    try:
        launch.launch(run_dir, typed.hardware, {"name": name, "group": group, "tags": tags, "overrides": overrides})
    except BaseException as e:
        metrics_file = run_dir / "metrics.json"
        if not metrics_file.is_file() or json.loads(metrics_file.read_text()).get("status") == "ok":
            write_metrics(run_dir, {"status": "failed", "error": f"{type(e).__name__}: {e}", "name": name,
                                    "overrides": overrides, "time/wall_s": time.perf_counter() - t_start})
        raise
    return json.loads((run_dir / "metrics.json").read_text())


def run_job(typed: RunConfig, run_dir: Path, resolved: dict[str, Any], *, name: str, group: str | None,
            tags: list[str], overrides: list[str]) -> dict[str, Any]:
    """The job itself, in this process (a single run, or one worker of a multi-process run): W&B run
    (main process only, finished in `finally`), training, metrics."""
    from sigil_exp.distributed import is_main
    from sigil_exp.tracking import finish_run, init_run, summary_metrics
    from sigil_exp.train import train, write_metrics

    t_start = time.perf_counter()
    wandb_run, failed, error = None, False, None
    try:
        if typed.dry_run:
            log.info("dry_run=true: the config composes and validates; nothing was trained (%s)", run_dir)
            validate(typed)
            return {"status": "dry_run"}
        if typed.wandb.mode != "disabled" and is_main():
            wandb_run = init_run(typed, run_dir, resolved, name=name, group=group, tags=tags)
        log.info("Run %s -> %s", name, run_dir)
        metrics = train(typed, run_dir, wandb_run)
        if not is_main():
            return metrics
        metrics.update(name=name, overrides=overrides)
        write_metrics(run_dir, metrics)
        if wandb_run is not None:  # scalar columns for the run table / parallel coordinates
            wandb_run.summary.update(summary_metrics(metrics, typed.sweep.objective, typed.sweep.direction))
        _print_summary(run_dir, metrics, wandb_run)
        return metrics
    except BaseException as e:
        failed, error = True, f"{type(e).__name__}: {e}"
        if is_main():  # record the failure in the run folder before anything else can go wrong
            write_metrics(run_dir, {"status": "failed", "error": error, "name": name, "overrides": overrides,
                                    "time/wall_s": time.perf_counter() - t_start})
        raise
    finally:
        finish_run(wandb_run, failed=failed, error=error)


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
        lines.append(f"  W&B offline: {offline}   (push: wandb sync {offline})")
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
        if multirun and cfg.sweep.one_gpu_per_job:
            _pin_gpu(cfg)
        return objective_value(run(cfg), objective, direction)
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


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes looks for an optional hub-fetched CPU kernel and falls back to its own: not news.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    hydra_main()


if __name__ == "__main__":
    main()
