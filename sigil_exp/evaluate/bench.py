"""Execution throughput: the naive one-rustc-per-sample loop against the batched fast path,
over the same samples, with the verdict agreement between the two.

    python -m sigil_exp.evaluate.bench                      # 226 samples from the bundled problems
    python -m sigil_exp.evaluate.bench --per-problem 5 --workers 2 --hostile 4
    python -m sigil_exp.evaluate.bench --slow-crate --limit 32 --compile-timeout-s 20   # one build never ends

The samples per problem: the canonical solution, `todo!()`, a wrong-type body `()`, an
operator flip of the canonical solution, and (with --per-problem 5) an undefined name; plus,
for the first --hostile problems, every completion of HOSTILE (attacks on the verdict: early
exits, forged libtest output, shadowed asserts, process constructors, reading the binary, ...
and correct bodies that use `crate::` / `$crate::` paths).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from sigil_exp.evaluate.execute import ExecConfig, Result, Sample, Toolchain, execute, find_toolchain
from sigil_exp.evaluate.problems import Problem, load_problems
from sigil_exp.evaluate.program import libtest_names
from sigil_exp.evaluate.sandbox import detect_sandbox

_FLIPS = ((" + ", " - "), (" < ", " <= "), (" > ", " >= "), (" == ", " != "), ("+= 1", "+= 2"), (".max(", ".min("))


def flip_operator(body: str) -> str:
    for a, b in _FLIPS:
        if a in body:
            return body.replace(a, b, 1)
    return body.replace("\n}", "\n    ;\n}", 1)  # nothing to flip: a harmless change


def _forged_output(p: Problem, with_names: bool = True) -> str:
    """A body that prints what a passing libtest run prints for the problem's tests, then exits 0."""
    names = libtest_names(p.test)
    lines = "".join(f"test {name} ... ok\\n" for name in names) if with_names else ""
    summary = f"test result: ok. {len(names)} passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"
    return ("    use std::io::Write;\n    let mut o = std::io::stdout();\n"
            f"    let _ = o.write_all(b\"ok\\n{lines}\\n{summary}; finished in 0.00s\\n\\n\");\n"
            "    let _ = o.flush();\n    std::process::exit(0)\n}\n")


WRONG = "    Default::default()\n}\n"  # a wrong answer that does not panic (where the type has a Default)
SHADOW = "macro_rules! assert_eq { ($($t:tt)*) => {} }\nmacro_rules! assert { ($($t:tt)*) => {} }\n"
HOSTILE = {  # name -> completion for a problem: attacks return a wrong answer, so a pass means it worked
    "exit0": lambda p: "    std::process::exit(0)\n}\n",
    "panic_hook_exit0": lambda p: "    std::panic::set_hook(Box::new(|_| std::process::exit(0)));\n    todo!()\n}\n",
    "trailing_cfg_any": lambda p: "    todo!()\n}\n#[cfg(any())]\n",
    "shadowed_asserts": lambda p: WRONG + SHADOW,
    "core_redirected": lambda p: WRONG + "#[macro_export]\n" + SHADOW.replace("\nmacro", "\n#[macro_export]\nmacro")
    + "extern crate self as core;\n",
    "forged_summary": lambda p: _forged_output(p, with_names=False),
    "forged_test_lines": _forged_output,
    "asm_constructor": lambda p: ("    mod c {\n        extern \"C\" fn bye() { std::process::exit(0) }\n"
                                  "        std::arch::global_asm!(\".pushsection .init_array,\\\"aw\\\"\", \".quad {f}\", "
                                  "\".popsection\", f = sym bye);\n    }\n" + WRONG.lstrip("\n")),
    "link_section_constructor": lambda p: WRONG + "extern \"C\" fn bye() { std::process::exit(0) }\n#[used]\n"
    "#[link_section = \".init_array\"]\nstatic CTOR: extern \"C\" fn() = bye;\n",
    "read_own_binary": lambda p: "    let _ = std::fs::read(std::env::current_exe().unwrap()).unwrap();\n" + p.canonical_solution,
    "read_sources": lambda p: ("    let _ = std::fs::read(std::env::current_exe().unwrap().with_file_name(\"main.rs\")).unwrap();\n"
                               + p.canonical_solution),
    "crate_path": lambda p: f"    use crate::{p.entry_point} as _;\n" + p.canonical_solution,
    "dollar_crate_path": lambda p: (f"    macro_rules! m {{ () => {{ use $crate::{p.entry_point} as _; }} }}\n    m!();\n"
                                    + p.canonical_solution),
}


def hostile_samples(problems: list[Problem]) -> list[Sample]:
    """Every HOSTILE completion for each problem (category `hostile/<name>`)."""
    return [Sample(p.task_id, f"hostile/{name}", p.prompt, make(p), p.test, 100 + k)
            for p in problems if p.canonical_solution for k, (name, make) in enumerate(HOSTILE.items())]


def bench_samples(problems: list[Problem], per_problem: int = 4) -> list[Sample]:
    """Canonical, obviously wrong and compile-error variants of each problem's solution."""
    out = []
    for p in problems:
        if not p.canonical_solution:
            continue
        variants = [p.canonical_solution, "    todo!()\n}\n", "    ()\n}\n", flip_operator(p.canonical_solution),
                    "    let _unused = undefined_helper(1);\n" + p.canonical_solution]
        out += [Sample.of(p, c, i) for i, c in enumerate(variants[:per_problem])]
    return out


def plain_naive(samples: list[Sample], tc: Toolchain, workers: int, timeout_s: float) -> list[str]:
    """Reference only: the loop without any sandbox (never use it on model output)."""
    def one(s: Sample) -> str:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "main.rs").write_text(s.source())
            try:
                c = subprocess.run([tc.rustc, "--edition", "2021", "--test", "main.rs", "-o", "main", "-C", "opt-level=0",
                                    "-C", "debuginfo=0"], cwd=d, capture_output=True, timeout=60)
            except subprocess.TimeoutExpired:
                return "timeout"
            if c.returncode != 0:
                return "compile_error"
            p = subprocess.Popen([str(Path(d) / "main"), "--test-threads=1"], cwd=d, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                return "pass" if p.wait(timeout=timeout_s) == 0 else "test_failure"
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return "timeout"

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, samples))


def _timed(samples: list[Sample], cfg: ExecConfig, sb, tc) -> tuple[list[Result], float]:
    t0 = time.perf_counter()
    results = execute(samples, cfg, sb, tc)
    return results, time.perf_counter() - t0


SLOW_MACRO = ("    macro_rules! m { () => {}; (x $($t:tt)*) => { m!($($t)*); m!($($t)*); } }\n"
              "    m!(" + "x " * 28 + ");\n")  # 2^28 expansions: rustc runs into any timeout


def slow_crate(problems: list[Problem]) -> list[Sample]:
    """Canonical solutions with one sample (the 6th) whose build never finishes in time."""
    samples = [Sample.of(p, p.canonical_solution) for p in problems if p.canonical_solution]
    samples[5] = Sample.of(problems[0], SLOW_MACRO + problems[0].canonical_solution, 1)
    return samples


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m sigil_exp.evaluate.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="pkg://assets/rust_problems.jsonl")
    ap.add_argument("--limit", type=int, default=50, help="problems to use (default 50: 200 samples)")
    ap.add_argument("--per-problem", type=int, default=4, choices=range(1, 6))
    ap.add_argument("--hostile", type=int, default=2, help=f"problems that also get the {len(HOSTILE)} hostile "
                    "completions (default 2: 26 samples)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="samples per crate on the fast path")
    ap.add_argument("--sandbox", default="auto")
    ap.add_argument("--timeout-s", type=float, default=10.0, help="per test run (eval.timeout_s)")
    ap.add_argument("--plain", action="store_true", help="also time the naive loop without any sandbox (reference)")
    ap.add_argument("--slow-crate", action="store_true", help="instead: --limit canonical solutions, one of them "
                    "replaced by a sample whose build never ends (what one rustc-crashing or very slow sample costs)")
    ap.add_argument("--compile-timeout-s", type=float, default=60.0, help="per rustc (eval.compile_timeout_s)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)

    problems = load_problems(args.problems, args.limit)
    if args.slow_crate:
        samples = slow_crate(problems)
    else:
        samples = bench_samples(problems, args.per_problem) + hostile_samples(problems[:args.hostile])
    sb, tc = detect_sandbox(args.sandbox), find_toolchain()
    cfg = ExecConfig(workers=args.workers, timeout_s=args.timeout_s, compile_timeout_s=args.compile_timeout_s)
    naive, t_naive = _timed(samples, replace(cfg, batch_size=1), sb, tc)
    fast, t_fast = _timed(samples, replace(cfg, batch_size=args.batch_size), sb, tc)
    same = [(a.verdict, a.reason, a.error_codes) == (b.verdict, b.reason, b.error_codes)
            for a, b in zip(naive, fast, strict=True)]
    summary = {
        "samples": len(samples), "workers": args.workers, "sandbox": sb.describe(),
        "naive_samples_per_min": round(len(samples) / t_naive * 60, 1),
        "fast_samples_per_min": round(len(samples) / t_fast * 60, 1),
        "speedup": round(t_naive / t_fast, 2),
        "verdict_agreement": f"{sum(same)}/{len(samples)}",
        "verdicts": dict(Counter(r.verdict for r in fast)),
        "reasons": dict(Counter(r.reason for r in fast if r.reason)),
        "fast_paths": dict(Counter(r.path for r in fast)), "load_avg_1m": round(os.getloadavg()[0], 2),
        "timeout_s": args.timeout_s,
    }
    if args.plain:
        t0 = time.perf_counter()
        plain = plain_naive(samples, tc, args.workers, args.timeout_s)
        t_plain = time.perf_counter() - t0
        summary["plain_naive_samples_per_min"] = round(len(samples) / t_plain * 60, 1)
        summary["plain_verdict_agreement"] = f"{sum(p == r.verdict for p, r in zip(plain, fast, strict=True))}/{len(samples)}"
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{len(samples)} samples, {args.workers} workers, test timeout {args.timeout_s}s, "
              f"sandbox {summary['sandbox']}, load average {summary['load_avg_1m']}")
        print(f"  naive (one rustc per sample): {t_naive:6.1f} s  {summary['naive_samples_per_min']:8.1f} samples/min")
        print(f"  fast  (batched crates):       {t_fast:6.1f} s  {summary['fast_samples_per_min']:8.1f} samples/min"
              f"  ({summary['speedup']}x)")
        if args.plain:
            print(f"  naive without sandbox (ref):  {t_plain:6.1f} s  {summary['plain_naive_samples_per_min']:8.1f} "
                  f"samples/min  (verdict agreement with fast: {summary['plain_verdict_agreement']})")
        print(f"  verdict + reason + error-code agreement naive/fast: {summary['verdict_agreement']}")
        print(f"  verdicts {summary['verdicts']}  reasons {summary['reasons']}  paths {summary['fast_paths']}")
        for a, b, ok in zip(naive, fast, same, strict=True):
            if not ok:
                print(f"  DIFFERENT {a.task_id}#{a.sample_idx}: naive {a.verdict} {a.reason} {a.error_codes} / "
                      f"fast {b.verdict} {b.reason} {b.error_codes}")
    return summary


if __name__ == "__main__":
    main()
