"""Execution throughput: the naive one-rustc-per-sample loop against the batched fast path,
over the same samples, with the verdict agreement between the two.

    python -m sigil_exp.evaluate.bench                      # ~200 samples from the bundled problems
    python -m sigil_exp.evaluate.bench --per-problem 5 --workers 2

The samples per problem: the canonical solution, `todo!()`, a wrong-type body `()`, an
operator flip of the canonical solution, and (with --per-problem 5) an undefined name.
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
from pathlib import Path

from sigil_exp.evaluate.execute import ExecConfig, Result, Sample, Toolchain, execute, find_toolchain
from sigil_exp.evaluate.problems import Problem, load_problems
from sigil_exp.evaluate.sandbox import detect_sandbox

_FLIPS = ((" + ", " - "), (" < ", " <= "), (" > ", " >= "), (" == ", " != "), ("+= 1", "+= 2"), (".max(", ".min("))


def flip_operator(body: str) -> str:
    for a, b in _FLIPS:
        if a in body:
            return body.replace(a, b, 1)
    return body.replace("\n}", "\n    ;\n}", 1)  # nothing to flip: a harmless change


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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m sigil_exp.evaluate.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="pkg://assets/rust_problems.jsonl")
    ap.add_argument("--limit", type=int, default=50, help="problems to use (default 50: 200 samples)")
    ap.add_argument("--per-problem", type=int, default=4, choices=range(1, 6))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="samples per crate on the fast path")
    ap.add_argument("--sandbox", default="auto")
    ap.add_argument("--timeout-s", type=float, default=10.0, help="per test run (eval.timeout_s)")
    ap.add_argument("--plain", action="store_true", help="also time the naive loop without any sandbox (reference)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)

    samples = bench_samples(load_problems(args.problems, args.limit), args.per_problem)
    sb, tc = detect_sandbox(args.sandbox), find_toolchain()
    naive, t_naive = _timed(samples, ExecConfig(workers=args.workers, batch_size=1, timeout_s=args.timeout_s), sb, tc)
    fast, t_fast = _timed(samples, ExecConfig(workers=args.workers, batch_size=args.batch_size,
                                              timeout_s=args.timeout_s), sb, tc)
    same = [(a.verdict, a.error_codes) == (b.verdict, b.error_codes) for a, b in zip(naive, fast, strict=True)]
    summary = {
        "samples": len(samples), "workers": args.workers, "sandbox": sb.describe(),
        "naive_samples_per_min": round(len(samples) / t_naive * 60, 1),
        "fast_samples_per_min": round(len(samples) / t_fast * 60, 1),
        "speedup": round(t_naive / t_fast, 2),
        "verdict_agreement": f"{sum(same)}/{len(samples)}",
        "verdicts": dict(Counter(r.verdict for r in fast)),
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
        print(f"  verdict + error-code agreement naive/fast: {summary['verdict_agreement']}  verdicts {summary['verdicts']}  "
              f"paths {summary['fast_paths']}")
        for a, b, ok in zip(naive, fast, same, strict=True):
            if not ok:
                print(f"  DIFFERENT {a.task_id}#{a.sample_idx}: naive {a.verdict} {a.error_codes} / "
                      f"fast {b.verdict} {b.error_codes}")
    return summary


if __name__ == "__main__":
    main()
