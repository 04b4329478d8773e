"""Multi-process start. The parent (`python -m sigil_exp hardware.nproc_per_node=N ...`) composes the
config once with Hydra, so the run has one folder and one `${now}`; it writes the resolved config
there (resolved_config.yaml) and the job's context (launch.json), then starts N workers on this node
through torch's own elastic launcher (what `torchrun` runs). Each worker reads that config, joins the
process group and runs the same job; only global rank 0 writes the run folder and the W&B run.

    python -m sigil_exp hardware=h200 hardware.nproc_per_node=2            # every GPU of one host
    python -m sigil_exp hardware.nproc_per_node=8 hardware.nnodes=2 \\
        hardware.rdzv_endpoint=node01:29500                                 # one such command per node
    python -m sigil_exp -m hydra/launcher=slurm hydra.launcher.nodes=2 \\
        hydra.launcher.gpus_per_node=8 hardware.nproc_per_node=8 hardware.nnodes=2   # SLURM: one task per node

Only `__main__` calls `launch`; workers enter through `python -m sigil_exp.launch --worker RUN_DIR`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from sigil_exp.config import HardwareConfig, SigilError

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500
EXIT_SIGIL_ERROR = 2
INTERRUPTED = "interrupted"  # a worker stopped by a signal writes "interrupted <signal number>"


def wants_launch(hw: HardwareConfig) -> bool:
    """This process should start workers: several processes asked for, and we are not one of them."""
    from sigil_exp.distributed import is_worker

    return hw.nproc_per_node * hw.nnodes > 1 and not is_worker()


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`gpu[03-04,07]` -> `gpu03`); scontrol where it exists."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def rendezvous(hw: HardwareConfig, run_dir: Path) -> dict[str, Any]:
    """Where the nodes of a run meet. One node: a private endpoint on this machine. Several: the
    configured `hardware.rdzv_endpoint`, else the first node of the SLURM allocation."""
    nodes = hw.nnodes
    if nodes == 1:
        return {"nnodes": 1, "nproc_per_node": hw.nproc_per_node, "rdzv_backend": "c10d",
                "rdzv_endpoint": "localhost:0", "run_id": hashlib.sha1(str(run_dir).encode()).hexdigest()[:12],
                "node_rank": 0}
    slurm_nodes = os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES")
    if slurm_nodes and int(slurm_nodes) != nodes:
        raise SigilError(f"hardware.nnodes={nodes} but this SLURM job has {slurm_nodes} nodes; set "
                         f"hardware.nnodes={slurm_nodes} (or hydra.launcher.nodes={nodes}).")
    endpoint = hw.rdzv_endpoint
    if not endpoint and os.environ.get("SLURM_JOB_NODELIST"):
        endpoint = f"{_first_slurm_host(os.environ['SLURM_JOB_NODELIST'])}:{DEFAULT_PORT}"
    if not endpoint:
        raise SigilError(f"hardware.nnodes={nodes} needs a meeting point for the nodes: set "
                         "hardware.rdzv_endpoint=<first node's host>:29500 on every node (SLURM jobs find it themselves).")
    run_id = os.environ.get("SLURM_JOB_ID") or hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
    return {"nnodes": nodes, "nproc_per_node": hw.nproc_per_node, "rdzv_backend": "c10d", "rdzv_endpoint": endpoint,
            "run_id": run_id, "node_rank": int(os.environ.get("SLURM_NODEID", hw.node_rank))}


def plan_text(plan: dict[str, Any], run_dir: Path) -> str:
    world = plan["nnodes"] * plan["nproc_per_node"]
    return (f"Launch: {plan['nproc_per_node']} worker(s) on this node (node {plan['node_rank']} of {plan['nnodes']}), "
            f"{world} in all; rendezvous {plan['rdzv_backend']} at {plan['rdzv_endpoint']} (run id {plan['run_id']}); "
            f"workers run `{sys.executable} -m sigil_exp.launch --worker {run_dir}`")


def launch(run_dir: Path, hw: HardwareConfig, job: dict[str, Any]) -> dict[str, Any]:
    """Start the workers and wait; returns the metrics rank 0 wrote. A failure on any rank ends the job
    with that rank's own sentence (SigilError); a signal ends it as RunInterrupted once the workers have
    stopped at a step boundary and saved (they record that themselves)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from sigil_exp import rundir

    plan = rendezvous(hw, run_dir)
    if hw.device == "cuda":
        import torch

        if torch.cuda.device_count() < hw.nproc_per_node:
            raise SigilError(f"hardware.nproc_per_node={hw.nproc_per_node} but this node has {torch.cuda.device_count()} "
                             f"GPU(s); set hardware.nproc_per_node={max(torch.cuda.device_count(), 1)}.")
    rundir.write_json(run_dir / "launch.json", {**job, "plan": plan})
    errors = run_dir / ".launch_errors"
    shutil.rmtree(errors, ignore_errors=True)
    errors.mkdir(parents=True)
    log.info(plan_text(plan, run_dir))
    cfg = LaunchConfig(min_nodes=plan["nnodes"], max_nodes=plan["nnodes"], nproc_per_node=plan["nproc_per_node"],
                       run_id=plan["run_id"], rdzv_backend=plan["rdzv_backend"], rdzv_endpoint=plan["rdzv_endpoint"],
                       max_restarts=0, monitor_interval=0.5, start_method="spawn")
    os.environ["SIGIL_LAUNCH_ERRORS"] = str(errors)
    try:
        elastic_launch(cfg, sys.executable)("-m", "sigil_exp.launch", "--worker", str(run_dir))
    except SignalException as e:  # this process got SIGTERM / SIGINT; the workers got it too and saved
        raise _interrupted(run_dir, int(e.sigval)) from None
    except ChildFailedError as e:
        sentence, signum = _failure(errors, e)
        if signum:
            raise _interrupted(run_dir, signum) from None
        if rundir.read_json(run_dir / rundir.METRICS).get("status") in (None, "ok"):
            rundir.write_json(run_dir / rundir.METRICS, {"status": "failed", "error": sentence,
                                                         "overrides": job.get("overrides")})
        raise SigilError(sentence) from None
    finally:
        os.environ.pop("SIGIL_LAUNCH_ERRORS", None)
    shutil.rmtree(errors, ignore_errors=True)
    return rundir.read_json(run_dir / rundir.METRICS)


def _interrupted(run_dir: Path, signum: int):
    """The job's RunInterrupted, with the step and checkpoint rank 0 recorded when it stopped."""
    from sigil_exp import rundir
    from sigil_exp.signals import RunInterrupted

    m = rundir.read_json(run_dir / rundir.METRICS)
    step = m.get("train/steps") if m.get("status") == "interrupted" else None
    ckpt = run_dir / "checkpoints" / f"checkpoint-{step}"
    return RunInterrupted(signum, step, str(ckpt) if step and ckpt.is_dir() else None, recorded=True)


def _failure(errors: Path, e: Exception) -> tuple[str, int | None]:
    """(the first failing rank's own one-line message, or the launcher's; the signal if it was one)."""
    found = sorted(errors.glob("rank*.txt"), key=lambda p: p.stat().st_mtime)
    if found:
        first = found[0]
        text = first.read_text().strip()
        if text.startswith(INTERRUPTED):
            return text, int(text.split()[1])
        return f"{first.stem.replace('rank', 'rank ')} failed: {text}", None
    failures = getattr(e, "failures", {}) or {}
    rank, failure = min(failures.items()) if failures else ("?", None)
    what = getattr(failure, "message", None) or str(e).strip().splitlines()[0]
    return f"rank {rank} failed (exit code {getattr(failure, 'exitcode', '?')}): {what}", None


def _worker_logging(run_dir: Path) -> None:
    from sigil_exp.distributed import is_main, rank

    fmt = f"[%(asctime)s][rank {rank()}][%(name)s][%(levelname)s] %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main():
        handlers.append(logging.FileHandler(run_dir / "run.log"))
    logging.basicConfig(level=logging.INFO if is_main() else logging.WARNING, format=fmt, handlers=handlers, force=True)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def worker_main(run_dir: Path) -> int:
    """One worker: the parent's resolved config, start and job context; the process group; the job."""
    from omegaconf import OmegaConf

    from sigil_exp import distributed, rundir
    from sigil_exp.config import RunConfig, to_object
    from sigil_exp.signals import RunInterrupted, handled

    _worker_logging(run_dir)
    job = json.loads((run_dir / "launch.json").read_text())
    try:
        with handled():  # a signal outside training (loading, data) stops this worker cleanly
            resolved = OmegaConf.load(run_dir / "resolved_config.yaml")
            cfg = to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), resolved))
            distributed.init(cfg.hardware.device)
            from sigil_exp.__main__ import run_job

            run_job(cfg, run_dir, OmegaConf.to_container(resolved), rundir.start_from_json(job["start"]),
                    overrides=job["overrides"], group=job["group"], tags=job["tags"], model_path=job["model_path"])
        return 0
    except BaseException as e:  # the parent reports the first failing rank's sentence
        interrupted = isinstance(e, RunInterrupted | KeyboardInterrupt)
        msg = f"{INTERRUPTED} {getattr(e, 'signum', 2)}" if interrupted else \
            (str(e) if isinstance(e, SigilError) else f"{type(e).__name__}: {e}")
        errors = os.environ.get("SIGIL_LAUNCH_ERRORS")
        if errors:
            Path(errors, f"rank{distributed.rank()}.txt").write_text(msg.splitlines()[0] if msg else type(e).__name__)
        if not (interrupted or isinstance(e, SigilError)):
            logging.getLogger("sigil_exp").exception("rank %d failed", distributed.rank())
        if interrupted:
            return getattr(e, "exit_code", 130)
        return EXIT_SIGIL_ERROR if isinstance(e, SigilError) else 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sigil_exp.launch", description="a worker of a multi-process run")
    ap.add_argument("--worker", required=True, type=Path, help="the run folder the parent prepared")
    args = ap.parse_args(argv)
    sys.exit(worker_main(args.worker))


if __name__ == "__main__":
    main()
