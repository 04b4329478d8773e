"""Compile and test samples: verdicts pass | test_failure | compile_error | timeout.

Two paths with identical verdicts:

- naive (`batch_size=1`): one `rustc --test` per sample, then its test binary.
- fast (the default): many samples become modules of one crate (`mod sigil_s00017 { prompt +
  completion + tests }`), compiled once; the binary then runs once per sample, each run its own
  sandboxed process with the filter `sigil_s00017::`, `--test-threads=1` and its own timeout, so
  one sample's infinite loop cannot time out its neighbours. When the crate fails to compile,
  the errors located inside a module are that sample's compile errors, and the rest is compiled
  again; errors located in no module (e.g. the linker), and timeouts, split the crate in two.

Why the verdicts (and error-code sets) are the naive ones: a sample that could behave
differently inside a module, or name another sample, never shares a crate (`batchable`: inner
attributes, `super::` outside the tests, `line!()`/`type_name`, exported or crate-global symbols,
`include!`, unbalanced braces, ...). So a module's errors come from its own code, and rustc's
"stop if there were errors" checkpoints between phases fire for it alone exactly as in the crate:
other samples' errors can only stop the build before this sample's first error, and then it
is simply compiled again in the next round. `python -m sigil_exp.evaluate.bench` checks this.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sigil_exp.config import SigilError
from sigil_exp.evaluate.problems import Problem, program_source, uses_test_harness
from sigil_exp.evaluate.rust_lex import is_self_contained
from sigil_exp.evaluate.sandbox import Command, Sandbox, compile_limits, run_limits, run_session

VERDICTS = ("pass", "test_failure", "compile_error", "timeout")
MODULE = "sigil_s{:05d}"
EXCERPT = 2000  # characters of compiler/test output kept per sample
RUN_CHUNK = 8  # fast path: test runs per sandbox session
MAX_WORKERS = 64  # one sandbox uid per worker slot (see sandbox.UID_BASE)
# Text that behaves differently inside a module than at a crate root, or clashes across modules.
_NOT_BATCHABLE = ("sigil_s", "#![", "super::", "pub(super)", "pub(in", "line!", "file!", "column!",
                  "module_path!", "type_name", "Location::caller", "no_mangle", "export_name", "link_section",
                  "macro_export", "include!", "include_str!", "include_bytes!", "#[path", "global_allocator",
                  "panic_handler", "alloc_error_handler")


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
        return program_source(self.prompt, self.completion, self.test)


@dataclass
class Result:
    task_id: str
    category: str
    sample_idx: int
    completion: str
    verdict: str  # pass | test_failure | compile_error | timeout
    error_codes: list[str] = field(default_factory=list)  # E0382, ...; "other" for errors without a code
    compile_s: float = 0.0  # batched builds: the crate's compile time divided by its samples
    run_s: float = 0.0
    stderr: str = ""  # excerpt: compiler errors, or the failing test's output
    stage: str = ""  # compile | run
    clippy_warnings: int | None = None
    path: str = "naive"  # naive | batch (how the verdict was produced)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Toolchain:
    rustc: str  # the toolchain's real rustc (not the rustup proxy)
    clippy_driver: str | None
    sysroot: str


@dataclass(frozen=True)
class ExecConfig:
    edition: str = "2021"
    timeout_s: float = 10.0  # per test run
    compile_timeout_s: float = 60.0  # per rustc invocation
    workers: int = 2
    batch_size: int = 32  # samples per crate; 1 = the naive one-rustc-per-sample path
    clippy: bool = False
    run_mem_mb: int = 1024
    codegen_units: int = 4


def find_toolchain() -> Toolchain:
    """The Rust toolchain, or a SigilError saying how to install it."""
    candidates = [shutil.which("rustc"), os.path.expanduser("~/.cargo/bin/rustc")]
    rustc = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if rustc is None:
        raise SigilError("rustc was not found on PATH or in ~/.cargo/bin; install Rust with "
                         "`curl --proto '=https' -sSf https://sh.rustup.rs | sh` (or `apt-get install rustc`) and retry.")
    try:
        sysroot = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True, check=True,
                                 timeout=60).stdout.strip()
    except (subprocess.SubprocessError, OSError) as e:
        raise SigilError(f"{rustc} --print sysroot failed ({e}); check the Rust install with `rustc -V`.") from None
    real = Path(sysroot) / "bin" / "rustc"
    clippy = Path(sysroot) / "bin" / "clippy-driver"
    if shutil.which("cc") is None:
        raise SigilError("rustc needs a C linker (`cc`) to build test binaries; install it with `apt-get install gcc`.")
    return Toolchain(rustc=str(real if real.is_file() else rustc),
                     clippy_driver=str(clippy) if clippy.is_file() else None, sysroot=sysroot)


# ------------------------------------------------------------------------------------ helpers
@dataclass
class _Build:
    ok: bool
    timed_out: bool
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


def _rendered(diags: list[dict], levels=("error",)) -> str:
    return "".join(d.get("rendered") or "" for d in diags if d.get("level") in levels)


def _clippy_count(diags: list[dict]) -> int:
    return sum(1 for d in diags if d.get("level") == "warning"
               and str((d.get("code") or {}).get("code", "")).startswith("clippy::"))


def _primary_line(d: dict, file_name: str) -> int | None:
    for s in d.get("spans") or []:
        if s.get("is_primary") and Path(s.get("file_name", "")).name == file_name:
            return int(s["line_start"])
    return None


def batchable(sample: Sample) -> bool:
    """Whether the sample can share a crate without changing its verdict (else: naive path)."""
    own = sample.prompt + sample.completion
    return (uses_test_harness(sample.test) and not any(s in own for s in _NOT_BATCHABLE)
            and "sigil_s" not in sample.test and is_self_contained(sample.source()))


class _Slots:
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
class _Ctx:
    sb: Sandbox
    tc: Toolchain
    cfg: ExecConfig
    root: Path
    slots: _Slots
    counter: Iterator[int]

    def new_dir(self, prefix: str) -> Path:
        d = self.root / f"{prefix}{next(self.counter)}"
        d.mkdir()
        d.chmod(0o755)
        return d


def _compile_many(ctx: _Ctx, sources: list[tuple[str, bool]]) -> list[_Build]:
    """Compile each (source, uses_test_harness) as its own crate, one rustc each, in one session."""
    compiler = ctx.tc.clippy_driver if ctx.cfg.clippy and ctx.tc.clippy_driver else ctx.tc.rustc
    dirs, cmds = [], []
    for source, harness in sources:
        d = ctx.new_dir("b")
        (d / "main.rs").write_text(source, encoding="utf-8")
        argv = [compiler, "--edition", ctx.cfg.edition, *(["--test"] if harness else []), "main.rs", "-o", "main",
                "-C", "opt-level=0", "-C", "debuginfo=0", "-C", f"codegen-units={ctx.cfg.codegen_units}",
                "--error-format=json", "--crate-name", "sample"]
        dirs.append(d)
        cmds.append(Command(argv=argv, limits=compile_limits(ctx.cfg.compile_timeout_s), cwd=d))
    with ctx.slots.take() as slot:
        results = run_session(ctx.sb, cmds, slot=slot, ro=(ctx.tc.sysroot,), rw=tuple(str(d) for d in dirs),
                              drop_uid=ctx.sb.level == "namespaces", full_stderr=64 << 20)
    builds = []
    for d, res in zip(dirs, results, strict=True):
        ok = res.returncode == 0 and not res.timed_out and (d / "main").is_file()
        builds.append(_Build(ok=ok, timed_out=res.timed_out, compile_s=res.wall_s,
                             diagnostics=_diagnostics(res.stderr_full), binary=d / "main"))
    return builds


@dataclass
class _Runnable:
    index: int  # into the samples list
    binary: Path
    filter: str | None
    harness: bool  # libtest binary (`--test`) or a plain main()
    result: Result  # filled in by the compile step; the run fills verdict, run_s, stderr


def _run_many(ctx: _Ctx, runs: list[_Runnable]) -> None:
    """Run each binary (with its filter) as its own process, in one session."""
    cmds = []
    for r in runs:
        argv = [str(r.binary)]
        if r.harness:
            argv += ["--test-threads=1"] + ([r.filter] if r.filter else [])
        cmds.append(Command(argv=argv, limits=run_limits(ctx.cfg.timeout_s, ctx.cfg.run_mem_mb)))
    ro = tuple(sorted({str(r.binary.parent) for r in runs}))
    with ctx.slots.take() as slot:
        results = run_session(ctx.sb, cmds, slot=slot, ro=ro)
    for r, res in zip(runs, results, strict=True):
        out = r.result
        out.run_s = res.wall_s
        out.stage = "run"
        out.verdict = "timeout" if res.timed_out else "pass" if res.returncode == 0 else "test_failure"
        if out.verdict != "pass":
            text = (res.stdout + ("\n" if res.stdout and res.stderr else "") + res.stderr).strip()
            if res.returncode >= 128 and not res.timed_out:
                text += f"\n(killed by signal {res.returncode - 128})"
            out.stderr = text[-EXCERPT:]


def _base_result(s: Sample, path: str) -> Result:
    return Result(task_id=s.task_id, category=s.category, sample_idx=s.sample_idx, completion=s.completion,
                  verdict="compile_error", path=path)


_Built = tuple[int, Result, "_Runnable | None"]


def _naive_builds(ctx: _Ctx, items: list[tuple[int, Sample]]) -> list[_Built]:
    """One rustc per sample (in one session): the reference verdicts."""
    builds = _compile_many(ctx, [(s.source(), uses_test_harness(s.test)) for _, s in items])
    out: list[_Built] = []
    for (idx, s), b in zip(items, builds, strict=True):
        res = _base_result(s, "naive")
        res.compile_s = b.compile_s
        res.stage = "compile"
        if ctx.cfg.clippy:
            res.clippy_warnings = _clippy_count(b.diagnostics)
        if b.ok:
            out.append((idx, res, _Runnable(idx, b.binary, None, uses_test_harness(s.test), res)))
            continue
        res.verdict = "timeout" if b.timed_out else "compile_error"
        res.error_codes = ["compile_timeout"] if b.timed_out else error_codes(b.diagnostics)
        res.stderr = ("rustc did not finish within eval.compile_timeout_s" if b.timed_out
                      else _rendered(b.diagnostics))[:EXCERPT]
        out.append((idx, res, None))
    return out


def _batch_source(samples: list[tuple[int, Sample]]) -> tuple[str, list[tuple[int, int]]]:
    """One crate: each sample in its own module; returns the source and each module's line span."""
    parts, spans, line = [], [], 1
    for idx, s in samples:
        body = s.source()
        text = f"mod {MODULE.format(idx)} {{\n{body}\n}}\n"
        n_lines = text.count("\n")
        spans.append((line, line + n_lines - 1))
        parts.append(text)
        line += n_lines
    return "".join(parts), spans


def _batch_build(ctx: _Ctx, samples: list[tuple[int, Sample]]) -> list[_Built]:
    """Build `samples` as one crate; fall back as described in the module docstring."""
    out: list[_Built] = []
    pending = list(samples)
    while pending:
        if len(pending) == 1:
            out += _naive_builds(ctx, pending)
            break
        source, spans = _batch_source(pending)
        b = _compile_many(ctx, [(source, True)])[0]
        if b.ok:
            share = b.compile_s / len(pending)
            for (idx, s), (lo, hi) in zip(pending, spans, strict=True):
                res = _base_result(s, "batch")
                res.compile_s = share
                if ctx.cfg.clippy:
                    res.clippy_warnings = _clippy_count([d for d in b.diagnostics
                                                         if lo <= (_primary_line(d, "main.rs") or 0) <= hi])
                out.append((idx, res, _Runnable(idx, b.binary, MODULE.format(idx) + "::", True, res)))
            break
        bad: set[int] = set()
        if not b.timed_out:
            for d in _errors(b.diagnostics):
                line = _primary_line(d, "main.rs")
                if line is None:
                    bad = set()
                    break
                bad |= {k for k, (lo, hi) in enumerate(spans) if lo <= line <= hi}
        if not bad:  # timeout or an error that names no sample: split in two
            half = len(pending) // 2
            out += _batch_build(ctx, pending[:half])
            out += _batch_build(ctx, pending[half:])
            break
        for k in sorted(bad):  # the errors inside a module are that sample's own: no sample can name another
            idx, s = pending[k]
            lo, hi = spans[k]
            own = [d for d in b.diagnostics if lo <= (_primary_line(d, "main.rs") or 0) <= hi]
            res = _base_result(s, "batch")
            res.stage = "compile"
            res.compile_s = b.compile_s / len(pending)
            res.error_codes = error_codes(own)
            res.stderr = _rendered(own)[:EXCERPT]
            if ctx.cfg.clippy:
                res.clippy_warnings = _clippy_count(own)
            out.append((idx, res, None))
        pending = [p for k, p in enumerate(pending) if k not in bad]
    return out


# -------------------------------------------------------------------------------------- entry
def execute(samples: list[Sample], cfg: ExecConfig, sandbox: Sandbox, toolchain: Toolchain | None = None,
            progress: Callable[[str], None] | None = None) -> list[Result]:
    """Verdicts for `samples`, in order. `cfg.batch_size=1` is the naive path."""
    tc = toolchain or find_toolchain()
    root = Path(tempfile.mkdtemp(prefix="sigil_eval_"))
    root.chmod(0o755)
    workers = max(1, min(cfg.workers, MAX_WORKERS))
    ctx = _Ctx(sb=sandbox, tc=tc, cfg=cfg, root=root, slots=_Slots(workers), counter=itertools.count())
    try:
        jobs: list[list[tuple[int, Sample]]] = []
        batch: list[tuple[int, Sample]] = []
        for i, s in enumerate(samples):
            if cfg.batch_size > 1 and batchable(s):
                batch.append((i, s))
            else:
                jobs.append([(i, s)])
        if batch:  # spread evenly so every worker gets a crate of about the same size
            n_crates = max(math.ceil(len(batch) / cfg.batch_size), min(workers, len(batch)))
            size = math.ceil(len(batch) / n_crates)
            jobs = [batch[k:k + size] for k in range(0, len(batch), size)] + jobs
        results: list[Result | None] = [None] * len(samples)
        # naive: one sandbox per run; fast: sessions of up to RUN_CHUNK runs (each its own process),
        # queued as soon as their crate is built so runs overlap the remaining compiles
        chunk = 1 if cfg.batch_size <= 1 else RUN_CHUNK
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            def build(job: list[tuple[int, Sample]]) -> list[_Built]:
                return _batch_build(ctx, job) if len(job) > 1 else _naive_builds(ctx, job)

            run_futures = []
            for fut in as_completed([pool.submit(build, job) for job in jobs]):
                runs = []
                for idx, res, run in fut.result():
                    results[idx] = res
                    if run is not None:
                        runs.append(run)
                run_futures += [pool.submit(_run_many, ctx, runs[k:k + chunk]) for k in range(0, len(runs), chunk)]
            for fut in run_futures:
                fut.result()
        if progress:
            progress(f"executed {len(samples)} samples in {time.perf_counter() - t0:.1f}s")
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]
    finally:
        shutil.rmtree(root, ignore_errors=True)


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
            detail = f" ({', '.join(r.error_codes)})" if r.error_codes else ""
            first = r.stderr.strip().splitlines()[0][:200] if r.stderr.strip() else ""
            failures.append(ProblemFailure(r.task_id, f"canonical solution gives {r.verdict}{detail}: {first}"))
    return failures
