"""Sweep report: every job of a multirun folder side by side, best first.

    python -m sigil_exp.report multirun/2026-11-28/10-00-00          # report.md, report.csv, *.png
    python -m sigil_exp.report <sweep dir> --objective eval/pass@1 --direction maximize
    python -m sigil_exp.report <sweep dir> --wandb                   # also log the table to W&B

It reads only the sweep folder: each job's `.hydra/overrides.yaml`, `resolved_config.yaml`,
`metrics.json` and W&B offline run (history of a job that died before writing metrics.json), so it
works with no network and no W&B account. The same report is written automatically when a sweep
ends (`SweepReportCallback`, configured in conf/config.yaml's `hydra.callbacks`; `sweep.report=false`
turns it off), and its table is logged to W&B as a small run (job_type "report") in the sweep's group.

Outputs in the sweep folder:
    report.md            the table (sorted by the objective), failures with their errors, the plots
    report.csv           the same rows, every override and metric in its own column
    loss_curves.png      train loss (lines) and eval loss (markers) of all jobs against the step
    objective_vs_<key>.png   the objective against each swept key
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sigil_exp.report_plots import plot_loss_curves, plot_objective_vs, safe_name

log = logging.getLogger(__name__)

# (column title, metrics.json key, format): the table's metric columns, in order. Eval rates appear
# only when some job has them (the evaluation stage writes eval/compile_rate and eval/pass@k).
COLUMNS = [
    ("trainable params", "params/trainable", "{:,.0f}"),
    ("train loss", "train/loss", "{:.4f}"),
    ("eval loss", "eval/loss", "{:.4f}"),
    ("compile rate", "eval/compile_rate", "{:.3f}"),
    ("pass@1", "eval/pass@1", "{:.3f}"),
    ("tokens/s", "train/tokens_per_s", "{:,.0f}"),
    ("peak mem GB", "sys/peak_mem_gb", "{:.2f}"),
    ("wall s", "time/wall_s", "{:.1f}"),
]
OPTIONAL = {"eval/compile_rate", "eval/pass@1"}


@dataclass
class Job:
    """One job folder of a sweep, as read back from disk."""

    dir: Path
    num: int
    overrides: dict[str, str]  # key -> value as typed on the command line (after sweep expansion)
    metrics: dict[str, Any]
    config: dict[str, Any]  # resolved config (empty if the job died before writing it)
    status: str  # ok | failed | interrupted (Ctrl-C/SIGTERM) | killed (no metrics.json) | running (folder locked)
    error: str = ""
    name: str = ""
    group: str = ""  # W&B group
    history: list[dict[str, Any]] = field(default_factory=list)
    objective: float | None = None

    @property
    def label(self) -> str:
        return self.name or self.dir.name

    def value(self, key: str) -> str:
        """The override as typed, unquoted; an interpolation also shows what it resolved to:
        `${mul:2,${lora.r}} (=32)`."""
        v = self.overrides.get(key, "")
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
            v = v[1:-1]
        if "${" in v:
            node: Any = self.config
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, int | float | str):
                v += f" (={node:g})" if isinstance(node, float) else f" (={node})"
        return v


# --------------------------------------------------------------------------------------- reading
def _split_override(o: str) -> tuple[str, str]:
    key, _, value = o.partition("=")
    return key.lstrip("+~"), value


def _read_yaml(path: Path) -> Any:
    # yaml, not OmegaConf: overrides such as lora.alpha=${lora.r} must stay as typed, unresolved.
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def _wandb_run(job_dir: Path) -> dict[str, Any] | None:
    from sigil_exp.tracking import find_run_file, read_offline_run

    try:
        return read_offline_run(find_run_file(job_dir / "wandb")) if (job_dir / "wandb").is_dir() else None
    except Exception as e:  # a run file cut short by a killed job: report the job without it
        log.warning("Could not read the W&B offline run of %s: %s", job_dir, e)
        return None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Folders holding a Hydra job (`.hydra/`), anywhere under the sweep folder."""
    found = [p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir() and p.parent != sweep_dir]
    return sorted(found, key=lambda p: (_job_num(p), str(p)))


def _job_num(job_dir: Path) -> int:
    hydra_cfg = _read_yaml(job_dir / ".hydra" / "hydra.yaml") or {}
    num = ((hydra_cfg.get("hydra") or {}).get("job") or {}).get("num")
    if isinstance(num, int):
        return num
    m = re.match(r"(\d+)", job_dir.name)
    return int(m.group(1)) if m else 10**9


def _from_wandb(run: dict[str, Any]) -> dict[str, Any]:
    """Numbers of a job that left no metrics.json: the last logged value of each key, then the summary's
    scalars (a defined metric's summary is a dict such as {'min': .., 'last': ..}: its last, else max)."""
    metrics: dict[str, Any] = {}
    for row in run["history"]:
        metrics.update({k: v for k, v in row.items() if not k.startswith("_")})
    for k, v in run["summary"].items():
        if isinstance(v, dict):
            v = v.get("last", v.get("max"))
        if not k.startswith("_") and (isinstance(v, int | float | str) or v is None):
            metrics[k] = v
    if "train/global_step" in metrics:
        metrics.setdefault("train/steps", metrics["train/global_step"])
    return metrics


def read_job(job_dir: Path) -> Job:
    from sigil_exp.rundir import is_locked

    overrides = dict(_split_override(o) for o in (_read_yaml(job_dir / ".hydra" / "overrides.yaml") or []))
    config = _read_yaml(job_dir / "resolved_config.yaml") or {}
    try:
        metrics = json.loads((job_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    run = _wandb_run(job_dir)
    if not metrics and run is not None:  # died before metrics.json: what W&B got is all there is
        metrics = _from_wandb(run)
        metrics["status"] = "killed"
    status = "running" if is_locked(job_dir) else (metrics.get("status") or "killed")
    error = str(metrics.get("error") or "")
    if status == "killed" and not error:
        error = "no metrics.json: the job was killed (out of memory? time limit? kill -9?)"
    elif status == "running":
        error = "still running (its folder is locked by a live process)"
    history = metrics.get("history") or (run["history"] if run else [])
    name = metrics.get("name") or (run["run"].get("name") if run else "") or ""
    return Job(dir=job_dir, num=_job_num(job_dir), overrides=overrides, metrics=metrics, config=config,
               status=status, error=error, name=name, group=run["run"].get("group", "") if run else "",
               history=history)


def _sweep_settings(sweep_dir: Path, jobs: list[Job]) -> dict[str, Any]:
    saved = _read_yaml(sweep_dir / "multirun.yaml") or {}
    for job in jobs:
        if job.config.get("sweep"):
            return job.config["sweep"]
    return saved.get("sweep") or {}


def swept_keys(sweep_dir: Path, jobs: list[Job]) -> list[str]:
    """Keys the sweep varied: its command line and search space, plus any key whose value differs."""
    from sigil_exp.tracking import swept_keys as declared

    keys = declared(sweep_dir)
    all_keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    keys += [k for k in all_keys if len({j.overrides.get(k) for j in jobs}) > 1]
    return [k for k in dict.fromkeys(keys) if not k.startswith("hydra")]


def collect(sweep_dir: str | Path, objective: str | None = None, direction: str | None = None
            ) -> tuple[list[Job], dict[str, Any]]:
    """All jobs, best first by the objective (failed, interrupted and killed jobs last), and the sweep's facts."""
    from sigil_exp.tracking import objective_value

    sweep_dir = Path(sweep_dir)
    jobs = [read_job(d) for d in job_dirs(sweep_dir)]
    settings = _sweep_settings(sweep_dir, jobs)
    objective = objective or settings.get("objective") or "eval/loss"
    direction = direction or settings.get("direction") or "minimize"
    if direction not in ("minimize", "maximize"):
        raise SystemExit(f"--direction={direction} must be minimize or maximize.")
    for job in jobs:
        value = objective_value(job.metrics, objective, direction)
        job.objective = value if math.isfinite(value) else None
    sign = 1 if direction == "minimize" else -1
    jobs.sort(key=lambda j: (j.status != "ok", j.objective is None, sign * (j.objective or 0.0), j.num))
    keys = swept_keys(sweep_dir, jobs)
    common = {k: v for k, v in (jobs[0].overrides.items() if jobs else []) if k not in keys
              and all(j.overrides.get(k) == v for j in jobs)}
    launcher = str(((_read_yaml(sweep_dir / "multirun.yaml") or {}).get("hydra") or {}).get("launcher", {})
                   .get("_target_", ""))
    devices = {(j.config.get("hardware") or {}).get("device") for j in jobs}
    facts = {"sweep_dir": str(sweep_dir), "objective": objective, "direction": direction, "swept": keys,
             "common": common, "launcher": launcher, "devices": sorted(d for d in devices if d),
             "optuna": _read_yaml(sweep_dir / "optimization_results.yaml")}
    return jobs, facts


# --------------------------------------------------------------------------------------- writing
def _fmt(value: Any, spec: str) -> str:
    """A number in its format, `—` when there is none (never a raw dict or list)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        return spec.format(value) if math.isfinite(value) else str(value)
    return value if isinstance(value, str) and value else "—"


def _metric_columns(jobs: list[Job]) -> list[tuple[str, str, str]]:
    return [c for c in COLUMNS if c[1] not in OPTIONAL or any(j.metrics.get(c[1]) is not None for j in jobs)]


def table_rows(jobs: list[Job], facts: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and raw rows (numbers unformatted): what the CSV and the W&B table hold."""
    cols = _metric_columns(jobs)
    header = ["rank", "job", "status", "name", *facts["swept"], f"objective ({facts['objective']})",
              *(c[1] for c in cols), "overrides", "error", "folder"]
    rows = []
    for i, j in enumerate(jobs, 1):
        rows.append([i if j.status == "ok" else "", j.num, j.status, j.name,
                     *(j.value(k) for k in facts["swept"]), j.objective,
                     *(j.metrics.get(c[1]) for c in cols),
                     " ".join(f"{k}={v}" for k, v in j.overrides.items()), j.error[:300],
                     str(j.dir.relative_to(facts["sweep_dir"]) if j.dir.is_relative_to(facts["sweep_dir"]) else j.dir)])
    return header, rows


def write_csv(path: Path, jobs: list[Job], facts: dict[str, Any]) -> None:
    header, rows = table_rows(jobs, facts)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def status_counts(jobs: list[Job]) -> str:
    """e.g. `2 ok, 1 failed, 1 killed`."""
    counts: dict[str, int] = {"ok": 0}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def markdown(jobs: list[Job], facts: dict[str, Any], plots: list[Path]) -> str:
    cols = _metric_columns(jobs)
    arrow = "lower is better" if facts["direction"] == "minimize" else "higher is better"
    ok = [j for j in jobs if j.status == "ok"]
    bad = [j for j in jobs if j.status != "ok"]
    lines = [f"# Sweep report: {facts['sweep_dir']}", ""]
    lines.append(f"{len(jobs)} jobs: {status_counts(jobs)}. Sorted by **{facts['objective']}** ({arrow}); "
                 "jobs that did not finish last.")
    if facts["swept"]:
        lines.append(f"Swept: {', '.join(f'`{k}`' for k in facts['swept'])}.")
    if facts["common"]:
        lines.append("Same in every job: " + " ".join(f"`{k}={v}`" for k, v in facts["common"].items()) + ".")
    best = next((j for j in ok if j.objective is not None), None)
    if best is not None:
        what = ", ".join(f"{k}={best.value(k)}" for k in facts["swept"]) or best.label
        lines.append(f"**Best: job {best.num} ({what}): {facts['objective']} = {best.objective:.4g}**, "
                     f"adapter in `{best.dir / 'adapter'}`.")
    if facts.get("optuna") and "best_params" in facts["optuna"]:
        bp = " ".join(f"{k}={v}" for k, v in facts["optuna"]["best_params"].items())
        lines.append(f"Optuna best trial (optimization_results.yaml): {bp} -> {facts['optuna'].get('best_value')}.")
    lines.append("")
    head = ["#", "job", "run", "status", *facts["swept"], facts["objective"], *(c[0] for c in cols)]
    lines.append("| " + " | ".join(_md_escape(h) for h in head) + " |")
    lines.append("|" + "|".join("---" if i < 4 + len(facts["swept"]) else "---:" for i in range(len(head))) + "|")
    for i, j in enumerate(jobs, 1):
        cells = [str(i) if j.status == "ok" else "", str(j.num), j.name,
                 j.status if j.status == "ok" else f"**{j.status}**",
                 *(f"`{j.value(k)}`" if k in j.overrides else "" for k in facts["swept"]),
                 _fmt(j.objective, "{:.4f}"), *(_fmt(j.metrics.get(c[1]), c[2]) for c in cols)]
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    if bad:
        lines += ["", "## Jobs that did not finish", ""]
        for j in bad:
            ov = " ".join(f"{k}={v}" for k, v in j.overrides.items() if k not in facts["common"])
            lines.append(f"- job {j.num} (`{ov}`): {j.status}: {_md_escape(j.error[:500])} — log: `{j.dir / 'run.log'}`")
    if "cpu" in facts["devices"] and "BasicLauncher" in facts["launcher"]:
        lines += ["", "Note: on CPU, peak memory is the process's peak RSS, which cannot be reset in-process: with "
                      "the sequential launcher each job reports the peak of all jobs so far. Use "
                      "`hydra/launcher=submitit_local` for per-job numbers (one process per job)."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Files: `report.csv` (every override and metric), job folders (`metrics.json`, `adapter/`, "
                  "`wandb/offline-run-*`: push with `wandb sync`).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ W&B
def log_to_wandb(sweep_dir: Path, jobs: list[Job], facts: dict[str, Any], plots: list[Path], *, project: str,
                 group: str, mode: str = "offline", entity: str | None = None) -> Path | None:
    """A small run (job_type "report") in the sweep's group holding the table and the plots."""
    import wandb

    header, rows = table_rows(jobs, facts)
    # W&B tables want one type per column: numbers stay numbers, anything else becomes text.
    cols = list(zip(*rows, strict=True))
    numeric = [all(v is None or v == "" or isinstance(v, int | float) and not isinstance(v, bool) for v in c)
               for c in cols]
    clean = [[(None if v == "" or isinstance(v, float) and not math.isfinite(v) else v) if numeric[i]
              else ("" if v is None else str(v)) for i, v in enumerate(row)] for row in rows]
    run = wandb.init(mode=mode, project=project, entity=entity, group=group, job_type="report", name=f"report-{group}",
                     dir=str(sweep_dir), reinit="finish_previous", tags=["sweep-report"],
                     config={"objective": facts["objective"], "direction": facts["direction"],
                             "swept": facts["swept"], "sweep_dir": facts["sweep_dir"]},
                     settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
    try:
        payload: dict[str, Any] = {"sweep/report": wandb.Table(columns=header, data=clean)}
        payload.update({f"sweep/{p.stem}": wandb.Image(str(p)) for p in plots})
        run.log(payload)
        best = next((j for j in jobs if j.status == "ok" and j.objective is not None), None)
        run.summary.update({"jobs": len(jobs), "jobs_failed": sum(j.status != "ok" for j in jobs),
                            **({"best/objective": best.objective, "best/job": best.label} if best else {})})
        sync_dir = Path(run.settings.sync_file).parent if mode == "offline" else None
    finally:
        run.finish()
    return sync_dir


# ------------------------------------------------------------------------------------------ main
def write_report(sweep_dir: str | Path, *, objective: str | None = None, direction: str | None = None,
                 wandb_project: str | None = None, wandb_group: str | None = None, wandb_mode: str = "offline",
                 wandb_entity: str | None = None) -> dict[str, Any]:
    """Write report.md, report.csv and the plots into `sweep_dir`; optionally log to W&B.
    Returns {'jobs', 'facts', 'markdown', 'csv', 'plots', 'wandb'}."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SystemExit(f"{sweep_dir} is not a folder; pass a multirun folder such as multirun/<date>/<time>.")
    jobs, facts = collect(sweep_dir, objective, direction)
    if not jobs:
        raise SystemExit(f"No jobs (folders with .hydra/) under {sweep_dir}; pass the multirun folder of a sweep.")
    plots = [p for p in [plot_loss_curves(jobs, sweep_dir / "loss_curves.png")] if p]
    for key in facts["swept"]:
        p = plot_objective_vs(jobs, key, facts, sweep_dir / f"objective_vs_{safe_name(key)}.png")
        if p:
            plots.append(p)
    md = sweep_dir / "report.md"
    md.write_text(markdown(jobs, facts, plots))
    write_csv(sweep_dir / "report.csv", jobs, facts)
    wandb_dir = None
    if wandb_project and wandb_mode != "disabled":
        from sigil_exp.tracking import sweep_group

        groups = [j.group for j in jobs if j.group]  # the group the jobs' runs are in
        group = wandb_group or (max(set(groups), key=groups.count) if groups else sweep_group(sweep_dir))
        wandb_dir = log_to_wandb(sweep_dir, jobs, facts, plots, project=wandb_project, mode=wandb_mode,
                                 group=group, entity=wandb_entity)
    return {"jobs": jobs, "facts": facts, "markdown": md, "csv": sweep_dir / "report.csv", "plots": plots,
            "wandb": wandb_dir}


class SweepReportCallback(Callback):
    """Hydra callback: writes the report when a sweep ends (after every job, failed ones included).

    Also saves `multirun.yaml` at the start, as Hydra's basic sweeper does and the optuna sweeper
    does not, so jobs can tag the keys the sweep varies. A report that cannot be written is logged;
    the sweep's exit code says whether every job finished ok."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)  # optuna's sqlite storage lives here
        OmegaConf.save(config, sweep_dir / "multirun.yaml")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the report; then, if any job did not finish ok, end the sweep with exit code 1 and a last
        line saying how many and where their logs are."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = None
        if OmegaConf.select(config, "sweep.report", default=True):
            try:
                wb = config.wandb
                out = write_report(sweep_dir, objective=config.sweep.objective, direction=config.sweep.direction,
                                   wandb_project=wb.project, wandb_group=wb.group, wandb_mode=wb.mode,
                                   wandb_entity=wb.entity)
                jobs = out["jobs"]
                log.info("Sweep report: %s (%d jobs: %s)\n%s", out["markdown"], len(jobs), status_counts(jobs),
                         _table_only(out["markdown"].read_text()))
            except BaseException as e:  # noqa: BLE001 - the sweep itself is done; never fail it here
                log.error("Sweep report failed (%s: %s); run `python -m sigil_exp.report %s` to retry.",
                          type(e).__name__, e, sweep_dir)
        if jobs is None:
            jobs = [read_job(d) for d in job_dirs(sweep_dir)]
        bad = [j for j in jobs if j.status != "ok"]
        if bad:
            logs = ", ".join(str(j.dir / "run.log") for j in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            print(f"sigil_exp: {len(bad)} of {len(jobs)} sweep jobs did not finish ok ({status_counts(jobs)}); "
                  f"their logs: {logs}", file=sys.stderr, flush=True)
            sys.exit(1)


def _table_only(md: str) -> str:
    return "\n".join(line for line in md.splitlines() if line.startswith(("|", "**Best")))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sigil_exp.report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", help="a multirun folder, e.g. multirun/2026-11-28/10-00-00")
    p.add_argument("--objective", help="metrics.json key to sort by (default: the sweep's sweep.objective)")
    p.add_argument("--direction", choices=["minimize", "maximize"], help="default: the sweep's sweep.direction")
    p.add_argument("--wandb", action="store_true", help="also log the table as a W&B run in the sweep's group")
    p.add_argument("--wandb-mode", default="offline", choices=["offline", "online"])
    p.add_argument("--wandb-project", default="sigil_exp")
    args = p.parse_args(argv)
    out = write_report(args.sweep_dir, objective=args.objective, direction=args.direction,
                       wandb_project=args.wandb_project if args.wandb else None, wandb_mode=args.wandb_mode)
    print(_table_only(out["markdown"].read_text()))
    print(f"\nWrote {out['markdown']}, {out['csv']}" + "".join(f", {p.name}" for p in out["plots"]))
    if out["wandb"]:
        print(f"W&B report run: {out['wandb']} (push: wandb sync {out['wandb']})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
