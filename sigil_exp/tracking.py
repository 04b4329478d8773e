"""Weights & Biases: run naming and grouping, init/finish, and reading offline runs back.

Offline is the default: a run is written to `<run folder>/wandb/offline-run-*/run-*.wandb` and can
be pushed later with `wandb sync`. `read_offline_run` decodes that file (a LevelDB-style log of
`wandb_internal_pb2.Record` protos) so tests and users can inspect a run without the dashboard.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from sigil_exp.config import RunConfig, SigilError

# Overrides that do not describe *what* a job is (they say where or how long it runs).
_NOT_IN_NAME = ("hydra.", "wandb.", "cache_dir", "experiment", "train.max_steps", "train.logging_steps",
                "train.eval_steps", "train.save_steps", "eval.", "data.sources", "model.name_or_path",
                "lora.r", "lora.alpha", "lora", "sweep.", "train.init_adapter", "train.resume", "train.overwrite")


def run_name(cfg: RunConfig, overrides: list[str] | None = None) -> str:
    """e.g. `r32-a16-all`, plus short forms of other swept keys (`r16-a32-attn-lr0.0001`)."""
    alpha = f"{cfg.lora.alpha:g}"
    targets = cfg.lora.name
    if any(ov.lstrip("+~").startswith("lora.target_modules=") for ov in overrides or []):
        targets = "+".join(m.removesuffix("_proj") for m in cfg.lora.target_modules)  # e.g. q+v
    parts = [f"r{cfg.lora.r}", f"a{alpha}", targets]
    for ov in overrides or []:
        key, _, value = ov.lstrip("+~").partition("=")
        if not value or key.startswith(_NOT_IN_NAME) and not key.startswith("lora."):
            continue
        if key in ("lora.r", "lora.alpha", "lora.name", "lora.target_modules"):
            continue
        short = {"train.lr": "lr", "lora.dropout": "do", "model": "", "quant": "", "hardware": "", "data": ""}.get(
            key, key.split(".")[-1])
        parts.append(f"{short}{value}".replace("/", "_"))
    return "-".join(p for p in parts if p)[:120]


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of every job of a sweep (and of its report run): `sweep-<sweep folder>`."""
    return "sweep-" + Path(sweep_dir).as_posix().strip("/").replace("/", "_").removeprefix("multirun_")


def swept_keys(sweep_dir: str | Path, sweeper_params: dict[str, Any] | None = None) -> list[str]:
    """The keys a sweep varies: sweep overrides on its command line (`lora.r=8,16`, `choice(...)`,
    `range(...)`, `interval(...)`) plus the sweeper's own `params` (optuna search space).

    The command line is read from `<sweep dir>/multirun.yaml`, which Hydra's basic sweeper writes
    (and the sweep-report callback for other sweepers) before the first job starts."""
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = [str(k) for k in (sweeper_params or {})]
    saved = Path(sweep_dir) / "multirun.yaml"
    if saved.is_file():
        hydra_cfg = (yaml.safe_load(saved.read_text()) or {}).get("hydra") or {}
        keys += [str(k) for k in ((hydra_cfg.get("sweeper") or {}).get("params") or {})]
        task = (hydra_cfg.get("overrides") or {}).get("task") or []
        try:
            parsed = OverridesParser.create().parse_overrides([str(t) for t in task])
        except Exception:  # an override this parser cannot read must never break a job
            parsed = []
        keys += [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    return list(dict.fromkeys(k for k in keys if not k.startswith("hydra")))


def summary_metrics(metrics: dict[str, Any], objective: str, direction: str) -> dict[str, Any]:
    """Explicit scalar summary columns for the run table and parallel-coordinates view:
    best eval loss, final train loss and tokens/s, peak memory, and the sweep objective."""
    history = metrics.get("history") or []
    evals = [r["eval/loss"] for r in history if isinstance(r.get("eval/loss"), int | float)]
    if isinstance(metrics.get("eval/loss"), int | float):
        evals.append(metrics["eval/loss"])
    out: dict[str, Any] = {
        "best/eval_loss": min(evals) if evals else None,
        "final/train_loss": metrics.get("train/loss"),
        "final/tokens_per_s": metrics.get("train/tokens_per_s"),
        "final/peak_mem_gb": metrics.get("sys/peak_mem_gb"),
        "objective": objective_value(metrics, objective, direction),
        "objective_key": objective,
    }
    return {k: v for k, v in out.items() if v is not None}


def objective_value(metrics: dict[str, Any], objective: str, direction: str) -> float:
    """The number a sweeper optimises. A failed job, or one without the metric, gets the worst
    value for the direction (+inf when minimising), so a search ranks it last and goes on.
    `eval/loss` falls back to `train/loss` when the data has no validation split."""
    value = metrics.get(objective) if metrics.get("status", "ok") == "ok" else None
    if value is None and objective == "eval/loss" and metrics.get("status", "ok") == "ok":
        value = metrics.get("train/loss")
    if isinstance(value, int | float) and value == value:  # not NaN
        return float(value)
    return float("inf") if direction == "minimize" else float("-inf")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 16}} -> {'lora.r': 16}: readable columns in the dashboard's run table."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def init_run(cfg: RunConfig, run_dir: Path, config_dict: dict[str, Any], *, name: str, group: str | None,
             tags: list[str], run_id: str | None = None):
    """Start the W&B run for this job (never reuses a previous job's run). `run_id` continues the run of an
    earlier attempt in the same folder (resume="allow"): offline, each attempt is a fragment
    (`wandb/offline-run-*-<id>`) and `wandb sync` of all of them uploads them, in order, as one run."""
    import wandb

    settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, init_timeout=ONLINE_TIMEOUT_S)
    if cfg.wandb.mode == "online":
        check_online(os.environ.get("WANDB_BASE_URL") or settings.base_url)
    try:
        run = wandb.init(
            mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity, group=group, name=name,
            tags=sorted(set(tags))[:20], job_type=cfg.wandb.job_type, dir=str(run_dir), config=flatten(config_dict),
            id=run_id, resume="allow" if run_id else None, reinit="finish_previous", settings=settings,
        )
    except wandb.errors.Error as e:  # no key, a key the server refuses, or no answer within init_timeout
        raise SigilError(f"wandb.mode={cfg.wandb.mode} could not start a W&B run ({str(e).splitlines()[0]}); check "
                         "`wandb login` and the network, or run with wandb.mode=offline and `wandb sync` later.") from None
    if run_id:  # a resumed run: its last attempt's status and error no longer hold
        run.summary.update({"status": "running", "error": None})
    # Summary values the run table and parallel-coordinates view use without setup.
    run.define_metric("eval/loss", summary="min,last")
    run.define_metric("train/loss", summary="min,last")
    run.define_metric("train/window_tokens_per_s", summary="last,mean")  # the run's steady train/tokens_per_s: set at the end
    run.define_metric("sys/peak_mem_gb", summary="max")
    return run


ONLINE_TIMEOUT_S = 15.0  # wandb.init's own default is 90 s


def check_online(base_url: str) -> None:
    """wandb.mode=online needs an API key and the server: say so in one sentence, in seconds, instead of a
    prompt, a traceback or a 90 s wait."""
    import socket
    from urllib.parse import urlparse

    try:  # wandb's own lookup (env, netrc, session), without its interactive prompt
        from wandb.sdk.lib.wbauth.authenticate import authenticate_session

        has_key = authenticate_session(host=base_url, source="sigil_exp", prompt=False, update_session=False) is not None
    except ImportError:  # moved in another wandb version: wandb.init reports it instead
        has_key = True
    if not has_key:
        raise SigilError("wandb.mode=online but no W&B API key is set (WANDB_API_KEY or `wandb login`); log in, or "
                         "run with wandb.mode=offline and `wandb sync` later.")
    url = urlparse(base_url)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        raise SigilError(f"wandb.mode=online but the W&B server {url.hostname} cannot be reached ({e}); check the "
                         "network, or run with wandb.mode=offline and `wandb sync` later.") from None


def steps_logged_before(run) -> int:
    """The last step an earlier attempt of this (resumed) W&B run got to W&B; 0 for a new run. Offline: read
    from the run's earlier fragments, so that rows a killed process never flushed count as missing (a resumed
    attempt sends them again from its carried history). Online: the server's step counter."""
    if run is None:
        return 0
    if run.settings.mode != "offline":
        return max(run.step - 1, 0)
    here = Path(run.settings.sync_file).parent
    earlier = [d for d in here.parent.glob(f"offline-run-*-{run.id}") if d != here]
    steps = [row.get("_step", 0) for d in earlier for row in read_offline_run(d)["history"]]
    return max(steps, default=0)


def finish_run(run, *, failed: bool = False, error: str | None = None, status: str | None = None,
               exit_code: int | None = None) -> None:
    """Always called (in a `finally`): the summary's `status` is ok, failed or interrupted, so sweeps show it.
    An interrupted run ends with the process's exit code (130 Ctrl-C, 143 SIGTERM); resuming continues it."""
    if run is None:
        return
    status = status or ("failed" if failed else "ok")
    run.summary["status"] = status
    if error and status != "ok":
        run.summary["error"] = error[:500]
    run.finish(exit_code=exit_code if exit_code is not None else (0 if status == "ok" else 1))


# ------------------------------------------------------------------------------ offline reader
_HEADER = 7
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path):
    """The records of a .wandb file; a file cut short by a killed process ends at its last whole record."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        block_left = _BLOCK - (pos % _BLOCK)
        if block_left < _HEADER:  # trailer padding at the end of a block
            pos += block_left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:
            pos += block_left  # zero padding
            continue
        if pos + _HEADER + length > len(data):
            return  # the writer was killed mid-record
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def _item_key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def run_files(path: str | Path) -> list[Path]:
    """The .wandb files of one run, oldest first: a file; an offline-run-* folder; or a run folder (or its
    wandb/) whose newest run may have several fragments, one per attempt (a resumed run)."""
    p = Path(path)
    if p.is_file():
        return [p]
    found = sorted(p.glob("run-*.wandb")) or sorted(p.glob("wandb/offline-run-*/run-*.wandb"), key=_started) \
        or sorted(p.glob("offline-run-*/run-*.wandb"), key=_started) or sorted(p.glob("**/run-*.wandb"), key=_started)
    if not found:
        raise FileNotFoundError(f"No W&B offline run (run-*.wandb) under {p}")
    run_id = found[-1].stem.removeprefix("run-")
    return [f for f in found if f.stem.removeprefix("run-") == run_id]


def _started(f: Path) -> str:
    return f.parent.name.removeprefix("offline-run-").removeprefix("run-")  # <date>_<time>-<id>


def find_run_file(path: str | Path) -> Path:
    """The newest .wandb file under `path` (see `run_files` for every fragment of a resumed run)."""
    return run_files(path)[-1]


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """Decode an offline run: {'run': {...}, 'config': {...}, 'history': [rows], 'summary': {...},
    'exit_code', 'fragments'}. The fragments of a resumed run (one per attempt) are read in order as one run."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    files = run_files(path)
    out: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}, "exit_code": None,
                           "fragments": len(files)}
    for f in files:
        out["exit_code"] = None  # a fragment killed before its exit record has none
        for raw in _records(f):
            rec = wandb_internal_pb2.Record()
            try:
                rec.ParseFromString(raw)
            except DecodeError:
                continue
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                r = rec.run
                out["run"] = out["run"] or {"id": r.run_id, "name": r.display_name, "group": r.run_group,
                                            "job_type": r.job_type, "project": r.project, "tags": list(r.tags)}
                for item in r.config.update:
                    out["config"][_item_key(item)] = json.loads(item.value_json)
            elif kind == "config":
                for item in rec.config.update:
                    out["config"][_item_key(item)] = json.loads(item.value_json)
            elif kind == "history":
                out["history"].append({_item_key(i): json.loads(i.value_json) for i in rec.history.item})
            elif kind == "summary":
                for item in rec.summary.update:
                    out["summary"][_item_key(item)] = json.loads(item.value_json)
            elif kind == "exit":
                out["exit_code"] = rec.exit.exit_code
    out["config"].pop("_wandb", None)
    return out
