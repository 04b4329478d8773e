"""Evaluation metrics: compile rate, unbiased pass@k, per-category rates, failure reasons,
error-code histogram."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from sigil_exp.evaluate.execute import VERDICTS, Result

KS = (1, 5, 10)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed stably."""
    if n < k:
        raise ValueError(f"pass@{k} needs n >= k samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _by_problem(results: list[Result]) -> dict[str, list[Result]]:
    out: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        out[r.task_id].append(r)
    return out


def _pass_at(results: list[Result], k: int) -> float:
    per = _by_problem(results)
    return float(np.mean([pass_at_k(len(rs), sum(r.verdict == "pass" for r in rs), k) for rs in per.values()]))


def _compiled(r: Result) -> bool:
    return r.stage == "run"  # got as far as running the tests (pass, test_failure or a run timeout)


def compute_metrics(results: list[Result]) -> dict[str, float]:
    """The flat metrics logged and returned: eval/compile_rate, eval/pass@k, per category, ..."""
    if not results:
        return {}
    per = _by_problem(results)
    n_min = min(len(rs) for rs in per.values())
    m: dict[str, float] = {
        "eval/compile_rate": float(np.mean([_compiled(r) for r in results])),
        "eval/n_problems": float(len(per)),
        "eval/n_samples": float(len(results)),
        "eval/mean_compile_s": float(np.mean([r.compile_s for r in results])),
    }
    for k in KS:
        if n_min >= k:
            m[f"eval/pass@{k}"] = _pass_at(results, k)
    verdicts = Counter(r.verdict for r in results)
    for v in VERDICTS:
        m[f"eval/rate/{v}"] = verdicts.get(v, 0) / len(results)
    for reason, count in sorted(Counter(r.reason for r in results if r.reason and r.verdict != "compile_error").items()):
        m[f"eval/failures/{reason}"] = float(count)  # test_failed, tests_missing, harness_bypassed, memory, ...
    clippy = [r.clippy_warnings for r in results if r.clippy_warnings is not None]
    if clippy:
        m["eval/clippy_warnings_mean"] = float(np.mean(clippy))
    by_cat: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_cat[r.category].append(r)
    for cat, rs in sorted(by_cat.items()):
        m[f"eval/compile_rate/{cat}"] = float(np.mean([_compiled(r) for r in rs]))
        m[f"eval/pass@1/{cat}"] = _pass_at(rs, 1)
    for code, count in error_histogram(results).items():
        m[f"eval/errors/{code}"] = float(count)
    return m


def error_histogram(results: list[Result]) -> dict[str, int]:
    """How many samples hit each compiler error code, most frequent first."""
    counts = Counter(code for r in results for code in r.error_codes)
    return dict(counts.most_common())
