"""Compile samples: alone (one rustc each) or many as the modules of one crate.

A crate of batch-safe samples (program.py, module form) is compiled once. When it fails:

- errors located inside modules are those samples' own compile errors (no sample can name
  another, so a module's errors come from its own code, and rustc's "stop if there were
  errors" checkpoints between phases can only hide a sample's errors, never invent them); the
  rest of the crate is compiled again without them;
- anything else (an error located in no module, such as a linker error or an internal compiler
  error, rustc crashing, or the crate taking longer than its time budget) sends every remaining
  sample to be compiled alone, in parallel. So one sample that crashes rustc or compiles
  forever costs one failed crate build plus the samples' own builds, never log2(n) rebuilds of
  the crate; and a crate's time budget is never a verdict, only the alone build's timeout is.

After a build only the binary stays in its directory (sources deleted), execute-only.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sigil_exp.evaluate.problems import Problem
from sigil_exp.evaluate.program import Program, crate_footer, joined_source
from sigil_exp.evaluate.sandbox import Command, Sandbox, Toolchain, compile_limits, run_session

EXCERPT = 2000  # characters of compiler/test output kept per sample


@dataclass
class Sample:
    task_id: str
    category: str
    prompt: str
    completion: str
    test: str
    sample_idx: int = 0

    @classmethod
    def of(cls, problem: Problem, completion: str, sample_idx: int = 0) -> Sample:
        return cls(problem.task_id, problem.category, problem.prompt, completion, problem.test, sample_idx)

    def source(self) -> str:
        """prompt + completion + tests as the problem states them (no hardening)."""
        return joined_source(self.prompt, self.completion, self.test)


@dataclass
class Result:
    task_id: str
    category: str
    sample_idx: int
    completion: str
    verdict: str  # pass | test_failure | compile_error | timeout | resource_limit
    reason: str = ""  # why it is not a pass (verdict.py), e.g. test_failed, tests_missing, memory
    error_codes: list[str] = field(default_factory=list)  # E0382, ...; "other" for errors without a code
    compile_s: float = 0.0  # batched builds: the crate's compile time divided by its samples
    run_s: float = 0.0
    stderr: str = ""  # excerpt: compiler errors, or the failing test's output
    stage: str = ""  # compile | run
    clippy_warnings: int | None = None
    path: str = "alone"  # batch (shared crate) | alone (own crate, module form) | isolated (root form)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExecConfig:
    edition: str = "2021"
    timeout_s: float = 10.0  # per test run
    compile_timeout_s: float = 60.0  # per rustc invocation (a shared crate gets a shorter budget)
    workers: int = 2
    batch_size: int = 32  # samples per crate; 1 = the naive one-rustc-per-sample path
    clippy: bool = False
    run_mem_mb: int = 4096  # RLIMIT_DATA of a test run
    run_threads: int = 256  # RLIMIT_NPROC of a test run
    run_output_mb: int = 64  # RLIMIT_FSIZE of a test run (stdout/stderr included)
    run_disk_mb: int = 256  # tmpfs quota of a test run's private directory (namespaces)
    run_cpu_s: float = 60.0  # RLIMIT_CPU of a test run (all threads)
    allow_root: bool = False  # rlimits level as root with rustc unable to drop root: run it anyway
    codegen_units: int = 4


@dataclass(frozen=True)
class Unit:
    index: int  # into the samples list
    sample: Sample
    program: Program


@dataclass
class Runnable:
    unit: Unit
    binary: Path
    result: Result  # filled in by the compile step; the run fills verdict, reason, run_s, stderr


Built = tuple[Unit, Result, "Runnable | None"]


class Slots:
    """Each concurrently running sandbox takes a slot: its own uid when the sandbox drops root."""

    def __init__(self, n: int):
        self._q: queue.Queue[int] = queue.Queue()
        for i in range(n):
            self._q.put(i)

    @contextmanager
    def take(self) -> Iterator[int]:
        slot = self._q.get()
        try:
            yield slot
        finally:
            self._q.put(slot)


@dataclass
class Ctx:
    sb: Sandbox
    tc: Toolchain
    cfg: ExecConfig
    root: Path
    slots: Slots
    std_alias: str
    counter: Iterator[int] = field(default_factory=itertools.count)

    def new_dir(self, prefix: str) -> Path:
        d = self.root / f"{prefix}{next(self.counter)}"
        d.mkdir()
        d.chmod(0o755)
        return d


# ------------------------------------------------------------------------------ diagnostics
@dataclass
class _Build:
    ok: bool
    timed_out: bool
    returncode: int
    compile_s: float
    diagnostics: list[dict]
    binary: Path


def _diagnostics(stderr: str) -> list[dict]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if d.get("$message_type", "diagnostic") == "diagnostic":
                out.append(d)
        elif line.strip():  # an ICE or a crash prints plain text
            out.append({"level": "error", "message": line, "code": None, "spans": [], "rendered": line + "\n"})
    return out


def _errors(diags: list[dict]) -> list[dict]:
    return [d for d in diags if d.get("level") in ("error", "error: internal compiler error")
            and not str(d.get("message", "")).startswith("aborting due to")]


def error_codes(diags: list[dict]) -> list[str]:
    """The distinct E-codes of the errors, sorted; `other` for errors that carry none."""
    return sorted({(d.get("code") or {}).get("code") or "other" for d in _errors(diags)})


def _rendered(diags: list[dict]) -> str:
    return "".join(d.get("rendered") or "" for d in diags if d.get("level") == "error")


def _clippy_count(diags: list[dict]) -> int:
    return sum(1 for d in diags if d.get("level") == "warning"
               and str((d.get("code") or {}).get("code", "")).startswith("clippy::"))


def _primary_line(d: dict, file_name: str) -> int | None:
    for s in d.get("spans") or []:
        if s.get("is_primary") and Path(s.get("file_name", "")).name == file_name:
            return int(s["line_start"])
    return None


# ------------------------------------------------------------------------------ compiling
def _compile_many(ctx: Ctx, sources: list[str], timeout_s: float) -> list[_Build]:
    """Compile each source as its own test crate, one rustc each, in one session; then leave
    only the (execute-only) binary in each directory."""
    compiler = ctx.tc.clippy_driver if ctx.cfg.clippy and ctx.tc.clippy_driver else ctx.tc.rustc
    dirs, cmds = [], []
    for source in sources:
        d = ctx.new_dir("b")
        (d / "main.rs").write_text(source, encoding="utf-8")
        argv = [compiler, "--edition", ctx.cfg.edition, "--test", "main.rs", "-o", "main",
                "-C", "opt-level=0", "-C", "debuginfo=0", "-C", f"codegen-units={ctx.cfg.codegen_units}",
                "--error-format=json", "--crate-name", "sample"]
        dirs.append(d)
        cmds.append(Command(argv=argv, limits=compile_limits(timeout_s), cwd=d))
    with ctx.slots.take() as slot:
        results = run_session(ctx.sb, cmds, slot=slot, ro=(ctx.tc.sysroot,), rw=tuple(str(d) for d in dirs),
                              drop_uid=not ctx.sb.rustc_as_root, full_stderr=64 << 20)
    builds = []
    for d, res in zip(dirs, results, strict=True):
        ok = res.returncode == 0 and not res.timed_out and (d / "main").is_file()
        _keep_binary_only(d, ok)
        builds.append(_Build(ok=ok, timed_out=res.timed_out, returncode=res.returncode, compile_s=res.wall_s,
                             diagnostics=_diagnostics(res.stderr_full), binary=d / "main"))
    return builds


def _keep_binary_only(d: Path, ok: bool) -> None:
    """A test must not read its sources (its crate-mates' among them) nor its binary (the
    sentinel's name is in there): delete everything but the binary, make it execute-only and,
    as root, owned by root (the sandbox uid that built it could otherwise read or chmod it)."""
    for f in d.iterdir():
        if f.name != "main" or not ok:
            f.unlink()
    for path, mode in ([(d / "main", 0o711)] if ok else []) + [(d, 0o711)]:
        if os.geteuid() == 0:
            os.chown(path, 0, 0)
        path.chmod(mode)


def _new_result(u: Unit, path: str) -> Result:
    s = u.sample
    return Result(task_id=s.task_id, category=s.category, sample_idx=s.sample_idx, completion=s.completion,
                  verdict="compile_error", reason="compile_error", path=path, stage="compile")


def build_alone(ctx: Ctx, units: list[Unit]) -> list[Built]:
    """One rustc per sample (in one session): module form for batch-safe samples, else root form."""
    sources = [u.program.text + (crate_footer(ctx.std_alias) if u.program.module else "") for u in units]
    out: list[Built] = []
    for u, b in zip(units, _compile_many(ctx, sources, ctx.cfg.compile_timeout_s), strict=True):
        res = _new_result(u, "alone" if u.program.module else "isolated")
        res.compile_s = b.compile_s
        if ctx.cfg.clippy:
            res.clippy_warnings = _clippy_count(b.diagnostics)
        if b.ok:
            out.append((u, res, Runnable(u, b.binary, res)))
            continue
        if b.timed_out:
            res.verdict, res.reason, res.error_codes = "timeout", "compile_timeout", ["compile_timeout"]
            res.stderr = "rustc did not finish within eval.compile_timeout_s"
        else:
            res.reason = "compile_error" if b.returncode == 1 else "rustc_crash"
            res.error_codes = error_codes(b.diagnostics)
            res.stderr = _rendered(b.diagnostics)[:EXCERPT]
        out.append((u, res, None))
    return out


def crate_budget(ctx: Ctx, n: int) -> float:
    """Seconds a crate of n samples may take before its samples are compiled alone instead."""
    return min(ctx.cfg.compile_timeout_s, 5.0 + 0.25 * n)


def build_crate(ctx: Ctx, units: list[Unit]) -> tuple[list[Built], list[Unit]]:
    """Build `units` as one crate: (what was decided, the units to compile alone)."""
    out: list[Built] = []
    pending = list(units)
    while len(pending) > 1:
        parts, spans, line = [], [], 1
        for u in pending:
            n_lines = u.program.text.count("\n")
            spans.append((line, line + n_lines - 1))
            parts.append(u.program.text)
            line += n_lines
        b = _compile_many(ctx, ["".join(parts) + crate_footer(ctx.std_alias)], crate_budget(ctx, len(pending)))[0]
        share = b.compile_s / len(pending)

        def own(lo: int, hi: int, diags: list[dict]) -> list[dict]:
            return [d for d in diags if lo <= (_primary_line(d, "main.rs") or 0) <= hi]

        if b.ok:
            for u, (lo, hi) in zip(pending, spans, strict=True):
                res = _new_result(u, "batch")
                res.compile_s = share
                if ctx.cfg.clippy:
                    res.clippy_warnings = _clippy_count(own(lo, hi, b.diagnostics))
                out.append((u, res, Runnable(u, b.binary, res)))
            return out, []
        errors = _errors(b.diagnostics)
        lines = [_primary_line(d, "main.rs") for d in errors]
        bad = {k for k, (lo, hi) in enumerate(spans) for ln in lines if ln is not None and lo <= ln <= hi}
        if b.timed_out or b.returncode != 1 or not bad or None in lines \
                or any(not any(lo <= ln <= hi for lo, hi in spans) for ln in lines if ln is not None):
            return out, pending  # over budget, crashed, or an error no module owns: each alone
        for k in sorted(bad):
            lo, hi = spans[k]
            mine = own(lo, hi, b.diagnostics)
            res = _new_result(pending[k], "batch")
            res.compile_s = share
            res.error_codes = error_codes(mine)
            res.stderr = _rendered(mine)[:EXCERPT]
            if ctx.cfg.clippy:
                res.clippy_warnings = _clippy_count(mine)
            out.append((pending[k], res, None))
        pending = [u for k, u in enumerate(pending) if k not in bad]
    return out, pending
