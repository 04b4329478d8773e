"""`python -m sigil_exp [overrides]`: compose the config, run one job, always close W&B.

    python -m sigil_exp experiment=smoke            # the demo: tiny model on CPU
    python -m sigil_exp lora.r=32 lora=attn         # overrides
    python -m sigil_exp -m lora.r=8,16,32           # a sweep; each job its own W&B run
    python -m sigil_exp --cfg job                   # print the composed config
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from sigil_exp.config import RunConfig, SigilError, to_object

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
        group = "sweep-" + Path(hc.sweep.dir).as_posix().strip("/").replace("/", "_").removeprefix("multirun_")
    swept = [o.partition("=")[0].lstrip("+~") for o in overrides if "=" in o and not o.startswith("hydra")]
    tags = [*cfg.wandb.tags, cfg.experiment, cfg.model.name, f"lora-{cfg.lora.name}",
            *(f"sweep:{k}" for k in swept if multirun)]
    return overrides, group, tags, multirun


def run(cfg: DictConfig) -> dict[str, Any]:
    """One job: typed config, run folder, W&B run (finished in `finally`), training."""
    from sigil_exp.tracking import finish_run, init_run, run_name
    from sigil_exp.train import train, write_metrics

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        typed = to_object(cfg)
    except MissingMandatoryValue as e:
        raise SigilError(f"{e.full_key} is required but not set (???); add `{e.full_key}=<value>` to the command.") from None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(OmegaConf.create(resolved), run_dir / "resolved_config.yaml")

    overrides, group, tags, multirun = _job_context(typed)
    name = typed.wandb.name or run_name(typed, overrides)
    wandb_run, failed, error = None, False, None
    try:
        if typed.wandb.mode != "disabled":
            wandb_run = init_run(typed, run_dir, resolved, name=name, group=group, tags=tags)
        log.info("Run %s -> %s", name, run_dir)
        metrics = train(typed, run_dir, wandb_run)
        metrics.update(name=name, overrides=overrides)
        write_metrics(run_dir, metrics)
        return metrics
    except BaseException as e:
        failed, error = True, f"{type(e).__name__}: {e}"
        # Record the failure in the run folder before anything else can go wrong.
        write_metrics(run_dir, {"status": "failed", "error": error, "name": name, "overrides": overrides})
        raise
    finally:
        finish_run(wandb_run, failed=failed, error=error)


def _objective(metrics: dict[str, Any]) -> float:
    value = metrics.get("eval/loss")
    if value is None:
        value = metrics.get("train/loss")
    return float(value) if value is not None else float("inf")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return _objective(run(cfg))
    except SigilError as e:
        print(f"sigil_exp: {e}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        log.error("Job failed: %s", e)
    except Exception as e:
        if not multirun:
            raise
        # A sweep goes on when one job fails; the job's folder records the error.
        log.error("Job failed: %s: %s\n%s", type(e).__name__, e, traceback.format_exc())
    return float("inf")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes looks for an optional hub-fetched CPU kernel and falls back to its own: not news.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    hydra_main()


if __name__ == "__main__":
    main()
