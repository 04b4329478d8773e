"""Compile and test samples: verdicts pass | test_failure | compile_error | timeout | resource_limit.

Two paths with identical verdicts (`python -m sigil_exp.evaluate.bench` and the tests check it):

- naive (`batch_size=1`): one `rustc --test` per sample, then its test binary.
- fast (the default): batch-safe samples become modules of shared crates, compiled once each
  (build.py); the binary then runs once per sample, each run its own sandboxed process with the
  filter `sigil_s00017::`, `--test-threads=1` and its own timeout and limits.

Why batching cannot change a verdict: a sample's program (program.py) is the same text and its
test binary gets the same arguments whether it shares a crate or not; samples that could act on
the whole binary or behave differently inside a module never share one (`batch_safe`), so a
crate-mate can neither reach it nor name it; and each run is its own process in its own
sandbox. Verdicts come from libtest's own account of the run, never from the exit status
alone (verdict.py). Where the files live: Sample, Result and ExecConfig in build.py, re-exported
here.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from sigil_exp.evaluate.build import (
    EXCERPT,
    Built,
    Ctx,
    ExecConfig,
    Result,
    Runnable,
    Sample,
    Slots,
    Unit,
    build_alone,
    build_crate,
    error_codes,
)
from sigil_exp.evaluate.problems import Problem
from sigil_exp.evaluate.program import MODULE, batch_safe, build_program, new_std_alias
from sigil_exp.evaluate.sandbox import (
    Command,
    Sandbox,
    Toolchain,
    check_root_compile,
    find_toolchain,
    run_limits,
    run_session,
)
from sigil_exp.evaluate.verdict import run_verdict

__all__ = ["VERDICTS", "EXCERPT", "ExecConfig", "Result", "Sample", "Toolchain", "execute", "find_toolchain",
           "check_problems", "ProblemFailure", "error_codes"]

VERDICTS = ("pass", "test_failure", "compile_error", "timeout", "resource_limit")
RUN_CHUNK = 8  # fast path: test runs per sandbox session
MAX_WORKERS = 64  # one sandbox uid per worker slot (see sandbox.UID_BASE)
LOG_EVERY_S = 30.0  # off a terminal: a progress line at most this often (and at each quarter)


def _run_many(ctx: Ctx, runs: list[Runnable]) -> int:
    """Run each binary (with its filter) as its own process, in one session; fill the verdicts."""
    cfg = ctx.cfg
    limits = run_limits(cfg.timeout_s, cfg.run_mem_mb, cfg.run_threads, cfg.run_output_mb, cfg.run_disk_mb,
                        cfg.run_cpu_s)
    cmds = [Command(argv=[str(r.binary), "--test-threads=1"] + ([r.unit.program.filter] if r.unit.program.filter
                                                                  else []), limits=limits) for r in runs]
    ro = tuple(sorted({str(r.binary.parent) for r in runs}))
    with ctx.slots.take() as slot:
        results = run_session(ctx.sb, cmds, slot=slot, ro=ro)
    for r, res in zip(runs, results, strict=True):
        out = r.result
        out.run_s = res.wall_s
        out.stage = "run"
        out.verdict, out.reason = run_verdict(res, r.unit.program, limits)
        if out.verdict != "pass":
            text = (res.stdout + ("\n" if res.stdout and res.stderr else "") + res.stderr).strip()
            if res.returncode >= 128 and not res.timed_out:
                text += f"\n(killed by signal {res.returncode - 128})"
            out.stderr = text[-EXCERPT:]
    return len(runs)


class _Progress:
    """compile/test progress: a tqdm bar on a terminal, else a few log lines through `emit`."""

    def __init__(self, total: int, emit: Callable[[str], None] | None):
        self.total, self.emit, self.done = total, emit, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if emit is not None and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="compile/test", unit="sample", leave=False)

    def add(self, n: int, crates_left: int) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(f"{crates_left} crates left", refresh=False)
            return
        now = time.perf_counter()
        quarter = self.total and (4 * self.done) // self.total > (4 * before) // self.total
        if self.emit and self.done < self.total and (quarter or now - self.last >= LOG_EVERY_S):
            self.last = now
            self.emit(f"compile/test: {self.done}/{self.total} samples, {crates_left} crates left")

    def close(self, rustc_runs: int) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.emit:
            self.emit(f"compile/test: {self.total} samples in {time.perf_counter() - self.t0:.1f}s "
                      f"({rustc_runs} rustc runs)")


def _chunks(items: list, size: int) -> list[list]:
    return [items[k:k + size] for k in range(0, len(items), max(1, size))]


def execute(samples: list[Sample], cfg: ExecConfig, sandbox: Sandbox, toolchain: Toolchain | None = None,
            progress: Callable[[str], None] | None = None) -> list[Result]:
    """Verdicts for `samples`, in order. `cfg.batch_size=1` is the naive path."""
    check_root_compile(sandbox, cfg.allow_root)
    tc = toolchain or find_toolchain()
    root = Path(tempfile.mkdtemp(prefix="sigil_eval_"))
    root.chmod(0o711)
    workers = max(1, min(cfg.workers, MAX_WORKERS))
    ctx = Ctx(sb=sandbox, tc=tc, cfg=cfg, root=root, slots=Slots(workers), std_alias=new_std_alias())
    naive = cfg.batch_size <= 1
    units = []
    for i, s in enumerate(samples):
        module = MODULE.format(i) if batch_safe(s.prompt, s.completion, s.test) else None
        units.append(Unit(i, s, build_program(s.prompt, s.completion, s.test, ctx.std_alias, module)))
    shared = [] if naive else [u for u in units if u.program.module]
    alone = [u for u in units if naive or not u.program.module]
    crates = []
    if shared:  # spread evenly so every worker gets a crate of about the same size
        n_crates = max(math.ceil(len(shared) / cfg.batch_size), min(workers, len(shared)))
        crates = _chunks(shared, math.ceil(len(shared) / n_crates))
    results: list[Result | None] = [None] * len(samples)
    bar = _Progress(len(samples), progress)
    # naive: one sandbox session per build and per run; fast: sessions of several, runs queued as
    # soon as their crate is built so they overlap the remaining compiles
    run_chunk = 1 if naive else RUN_CHUNK

    def alone_jobs(pool: ThreadPoolExecutor, units: list[Unit]) -> set[Future]:
        """Build `units` alone, a few per session (one each on the naive path), spread over the workers."""
        size = 1 if naive else min(8, math.ceil(len(units) / workers))
        return {pool.submit(lambda us: (build_alone(ctx, us), []), c) for c in _chunks(units, size)}

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            builds: set[Future] = {pool.submit(build_crate, ctx, c) for c in crates} | alone_jobs(pool, alone)
            runs: set[Future] = set()
            while builds or runs:
                done, _ = wait(builds | runs, return_when=FIRST_COMPLETED)
                for fut in done:
                    if fut in runs:
                        runs.discard(fut)
                        bar.add(fut.result(), len(builds))
                        continue
                    builds.discard(fut)
                    built, retry = fut.result()
                    runnable = _collect(built, results)
                    builds |= alone_jobs(pool, retry)
                    runs |= {pool.submit(_run_many, ctx, c) for c in _chunks(runnable, run_chunk)}
                    bar.add(len(built) - len(runnable), len(builds))
        bar.close(rustc_runs=next(ctx.counter))  # one build directory per rustc run
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _collect(built: list[Built], results: list[Result | None]) -> list[Runnable]:
    runnable = []
    for unit, res, run in built:
        results[unit.index] = res
        if run is not None:
            runnable.append(run)
    return runnable


@dataclass(frozen=True)
class ProblemFailure:
    task_id: str
    reason: str


def check_problems(problems: list[Problem], cfg: ExecConfig | None = None, sandbox: Sandbox | None = None,
                   toolchain: Toolchain | None = None) -> list[ProblemFailure]:
    """Problems whose canonical solution does not pass its tests (or would be cut short by the
    brace stop). Problems without a canonical solution are skipped."""
    from sigil_exp.evaluate.rust_lex import truncate_body
    from sigil_exp.evaluate.sandbox import detect_sandbox

    with_solution = [p for p in problems if p.canonical_solution]
    failures = []
    for p in with_solution:
        cut = truncate_body(p.canonical_solution)
        if cut.rstrip() != p.canonical_solution.rstrip():
            failures.append(ProblemFailure(p.task_id, f"the brace stop cuts the canonical solution after {len(cut)} chars"))
    samples = [Sample.of(p, p.canonical_solution) for p in with_solution]
    results = execute(samples, cfg or ExecConfig(), sandbox or detect_sandbox(), toolchain)
    for r in results:
        if r.verdict != "pass":
            detail = f" ({', '.join(r.error_codes or [r.reason])})"
            first = r.stderr.strip().splitlines()[0][:200] if r.stderr.strip() else ""
            failures.append(ProblemFailure(r.task_id, f"canonical solution gives {r.verdict}{detail}: {first}"))
    return failures
