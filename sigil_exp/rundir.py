"""The run folder as a record you can trust: one writer, atomic files, complete checkpoints, resume.

    <run>/.lock              fcntl lock held while a process works in the folder (the kernel drops it on kill -9)
    <run>/run_state.json     the W&B run (id, name, group, tags), attempts, whether a restart continues the run
    <run>/metrics.json       written whole (temp file + rename) at the end of every attempt
    <run>/checkpoints/checkpoint-N/   complete or absent: written under checkpoints/.partial/, then renamed;
                             each holds history.json (the metrics rows up to step N) next to the trainer's files

Every file of a run goes through `write_json`, `write_config` or `_publish` (and the lock through
`locked`), so that a later "only rank 0 writes" gate has one place to live. `prepare()` decides how an attempt starts: fresh, resumed from
the newest complete checkpoint, refused, or "already finished, nothing to do".
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sigil_exp.config import RunConfig, SigilError
from sigil_exp.distributed import barrier, is_main

log = logging.getLogger(__name__)

STATE, METRICS, LOCK = "run_state.json", "metrics.json", ".lock"
STAGING = ".partial"  # checkpoints/.partial/checkpoint-N while a save is in progress
HISTORY = "history.json"
# Without these a checkpoint cannot continue the run exactly (weights, optimizer, LR schedule, step).
REQUIRED = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")
_CKPT = re.compile(r"checkpoint-(\d+)$")


# ---------------------------------------------------------------------------------- writing files
def write_json(path: Path, data: Any) -> None:
    """Write a JSON file whole: a temp file renamed over the old one, so a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def write_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    """resolved_config.yaml: the whole resolved config of this attempt."""
    from omegaconf import OmegaConf

    tmp = run_dir / "resolved_config.yaml.tmp"
    OmegaConf.save(OmegaConf.create(resolved), tmp)
    tmp.replace(run_dir / "resolved_config.yaml")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_state(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / STATE)


def update_state(run_dir: Path, **fields: Any) -> None:
    write_json(run_dir / STATE, {**read_state(run_dir), **fields})


# ------------------------------------------------------------------------------------------ lock
@contextmanager
def locked(run_dir: Path):
    """Hold `<run>/.lock` (flock) while working in the folder; a second writer is refused in one sentence."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = (run_dir / LOCK).open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SigilError(f"Run folder {run_dir} is in use by {holder}; wait for that run to end, or give this one "
                         "another folder (hydra.run.dir=<new folder>).") from None
    try:
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def is_locked(run_dir: Path) -> bool:
    """True while some process holds the run folder's lock (the run is still going)."""
    path = run_dir / LOCK
    if not path.is_file():
        return False
    with path.open() as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


# ----------------------------------------------------------------------------------- checkpoints
def checkpoint_step(path: Path) -> int | None:
    m = _CKPT.search(path.name)
    return int(m.group(1)) if m else None


def missing_files(ckpt: Path) -> list[str]:
    return [name for name in REQUIRED if not (ckpt / name).is_file()]


def newest_complete(ckpt_root: Path) -> tuple[Path | None, dict[Path, list[str]]]:
    """The newest checkpoint holding every file a resume needs, and the newer ones skipped (with what they lack)."""
    found = sorted((p for p in ckpt_root.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None),
                   key=checkpoint_step, reverse=True)
    skipped: dict[Path, list[str]] = {}
    for ckpt in found:
        missing = missing_files(ckpt)
        if not missing:
            return ckpt, skipped
        skipped[ckpt] = missing
    return None, skipped


def save_checkpoints_atomically(trainer, history) -> None:
    """Make the trainer's checkpoint saves atomic and add `history.json` (rows of `history()`) to each.

    transformers' `_save_checkpoint` writes into `<output_dir>/checkpoint-N` file by file; a kill in the
    middle left a folder without trainer_state.json that a resume then picked. Here it writes into
    `checkpoints/.partial/checkpoint-N` (its output folder is redirected for the call), the history is
    added, and the folder is renamed into place: a `checkpoint-N` is complete or absent. trl's
    hub model card (which asks the offline W&B run for a URL, a warning at every save) is not written."""
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    root = Path(trainer.args.output_dir)

    def save(model, trial=None) -> None:
        staging = root / STAGING
        if is_main():
            shutil.rmtree(staging, ignore_errors=True)
        barrier()  # data parallel: every rank writes its RNG state into the same staging folder
        trainer._get_output_dir = lambda trial=None: str(staging)
        try:
            Trainer._save_checkpoint(trainer, model, trial)
        finally:
            del trainer._get_output_dir  # back to the class's method
        barrier()
        if not is_main():  # the main process publishes the checkpoint
            barrier()
            return
        step = trainer.state.global_step
        tmp, final = staging / f"checkpoint-{step}", root / f"checkpoint-{step}"
        best = trainer.state.best_model_checkpoint
        if best and Path(best).parent == staging:  # recorded against the staging folder: point at the final one
            trainer.state.best_model_checkpoint = str(root / Path(best).name)
            trainer.state.save_to_json(str(tmp / "trainer_state.json"))
        _publish(tmp, final, history())
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(str(root), trainer.args.save_total_limit, trainer.state.best_model_checkpoint)
        barrier()

    trainer._save_checkpoint = save


def _publish(tmp: Path, final: Path, history: list[dict[str, Any]]) -> None:
    write_json(tmp / HISTORY, history)
    if final.exists():  # an earlier attempt got past this step before it was killed: this save replaces it
        shutil.rmtree(final)
    tmp.rename(final)


def restore_final_checkpoint(trainer, ckpt: Path) -> None:
    """The run was killed after its last checkpoint: load that checkpoint's adapter and state instead of
    training (transformers would train one step past max_steps when resumed from the last step)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(trainer.model, load_file(str(ckpt / "adapter_model.safetensors")))
    trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))


# ------------------------------------------------------------------------------ how a run starts
@dataclass
class Start:
    """How this attempt begins. Fresh by default; `prepare()` fills it from the run folder."""

    checkpoint: Path | None = None  # resume from here
    step: int = 0  # the checkpoint's global step
    planned_steps: int = 0  # the checkpoint's max_steps (trainer_state.json)
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics rows up to `step`
    wandb: dict[str, Any] = field(default_factory=dict)  # id, name, group, tags of this run's W&B run
    attempt: int = 1
    finished: dict[str, Any] | None = None  # metrics.json of a run that is already done: nothing to do

    def past_end(self, max_steps: int) -> bool:
        """The checkpoint is the run's last step (killed after its final save): nothing left to train."""
        end = max_steps if max_steps > 0 else self.planned_steps
        return self.checkpoint is not None and end > 0 and self.step >= end


def start_to_json(start: Start) -> dict[str, Any]:
    """A Start as JSON, for the workers of a multi-process run (the parent decides once how it starts)."""
    return {**{k: getattr(start, k) for k in ("step", "planned_steps", "history", "wandb", "attempt", "finished")},
            "checkpoint": str(start.checkpoint) if start.checkpoint else None}


def start_from_json(d: dict[str, Any]) -> Start:
    return Start(**{**d, "checkpoint": Path(d["checkpoint"]) if d.get("checkpoint") else None})


def prepare(cfg: RunConfig, run_dir: Path) -> Start:
    """Decide how this attempt starts (call with the lock held). Refuses, in one sentence, to start over
    a folder that holds checkpoints unless told to (`train.resume=auto` or `train.overwrite=true`)."""
    tr, state = cfg.train, read_state(run_dir)
    ckpt_root = run_dir / "checkpoints"
    existing = sorted(p.name for p in ckpt_root.glob("checkpoint-*")) if ckpt_root.is_dir() else []
    if tr.overwrite:
        removed = [p.name for p in (run_dir / n for n in ("checkpoints", "adapter", "eval", METRICS, STATE)) if p.exists()]
        for name in removed:
            p = run_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if removed:
            log.info("train.overwrite=true: removed %s from %s; starting over", ", ".join(removed), run_dir)
        return Start()
    resume = tr.resume
    if not resume and state.get("resume_on_restart"):
        resume = "auto"
        log.info("%s was stopped by %s and has been restarted (a launcher requeue): continuing it as with "
                 "train.resume=auto", run_dir, state.get("stopped_by", "a signal"))
    if not resume:
        if existing:
            raise SigilError(f"Run folder {run_dir} already holds checkpoints ({existing[-1]}); add train.resume=auto "
                             "to continue that run, or train.overwrite=true to delete them and start over.")
        return Start(attempt=state.get("attempts", 0) + 1)

    metrics = read_json(run_dir / METRICS)
    start = Start(wandb=state.get("wandb") or {}, attempt=state.get("attempts", 0) + 1)
    if metrics.get("status") == "ok" and not _asks_for_more(cfg, run_dir, metrics):
        start.finished = metrics
        return start
    ckpt = _resume_checkpoint(resume, ckpt_root)
    if ckpt is None:
        log.info("train.resume=%s: no complete checkpoint in %s yet; starting from step 0", resume, ckpt_root)
        return start
    trainer_state = read_json(ckpt / "trainer_state.json")
    start.checkpoint, start.step = ckpt, int(trainer_state.get("global_step", 0))
    start.planned_steps = int(trainer_state.get("max_steps") or 0)
    if (ckpt / HISTORY).is_file():
        start.history = [r for r in json.loads((ckpt / HISTORY).read_text()) if r.get("train/global_step", 0) <= start.step]
    else:
        log.warning("%s has no %s (saved by an older version): metrics.json will hold only the rows from step %d on",
                    ckpt, HISTORY, start.step + 1)
    return start


def _resume_checkpoint(resume: str, ckpt_root: Path) -> Path | None:
    if resume != "auto":
        ckpt = Path(resume).expanduser()
        if not ckpt.is_dir():
            raise SigilError(f"train.resume={resume} is not a folder; use train.resume=auto or a checkpoint-N folder.")
        missing = missing_files(ckpt)
        if missing:
            raise SigilError(f"train.resume={resume} lacks {', '.join(missing)} (an interrupted save); use "
                             "train.resume=auto to take the newest complete checkpoint.")
        return ckpt
    shutil.rmtree(ckpt_root / STAGING, ignore_errors=True)  # a save that a kill cut short
    ckpt, skipped = newest_complete(ckpt_root) if ckpt_root.is_dir() else (None, {})
    for bad, missing in skipped.items():  # never resumable; removed so that checkpoint rotation does not count them
        log.warning("train.resume=auto: skipping and removing %s (no %s: its save was cut short)", bad.name,
                    ", ".join(missing))
        shutil.rmtree(bad, ignore_errors=True)
    if ckpt is not None:
        log.info("train.resume=auto: continuing from %s (the newest complete checkpoint)", ckpt)
    return ckpt


def _asks_for_more(cfg: RunConfig, run_dir: Path, metrics: dict[str, Any]) -> bool:
    """Does this command ask a finished run to train further (a larger train.max_steps or train.epochs)?"""
    import yaml

    done = int(metrics.get("train/steps") or 0)
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps > done
    try:
        old = (yaml.safe_load((run_dir / "resolved_config.yaml").read_text()) or {}).get("train") or {}
    except (OSError, yaml.YAMLError):
        old = {}
    return (old.get("max_steps") or -1) > 0 or cfg.train.epochs > float(old.get("epochs") or 0)
