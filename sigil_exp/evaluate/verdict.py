"""A test run's verdict from what the sandbox saw: exit status, signals, sizes, libtest's output.

A pass is libtest's own account of a complete run, not an exit status: the process exited 0,
its output holds exactly one libtest summary, `test result: ok. N passed; 0 failed; ...`, the
sentinel test was announced (libtest reaches it only after every other test of the sample has
finished; see program.py) and each expected test of the problem was announced and reported
`ok`. Anything else is a failure with its reason:

    test_failure    test_failed       libtest reported a failing test
                    crashed           the process died another way (signal, abort, odd exit code)
                    tests_missing     libtest finished fine, but a test of the problem never ran
                                      (e.g. a trailing `#[cfg(any())]` removed the test module)
                    harness_bypassed  exit status 0 without libtest's complete account: the sample
                                      exited early (`process::exit(0)`, a panic hook that exits 0)
                                      or printed a summary of its own
    resource_limit  memory | threads | output | disk | cpu_time   the limit the run hit
    timeout         test_timeout      the run exceeded eval.timeout_s
"""

from __future__ import annotations

import re
import signal

from sigil_exp.evaluate.program import Program
from sigil_exp.evaluate.sandbox import Limits, ProcResult

_SUMMARY = re.compile(r"^test result: (ok|FAILED)\. (\d+) passed; (\d+) failed;", re.M)
_MEMORY = re.compile(r"memory allocation of \d+ bytes failed|Cannot allocate memory|os error 12\b|code: 12, kind: OutOfMemory")
_THREADS = re.compile(r"failed to spawn thread.*(?:code: 11\b|os error 11\b)|Resource temporarily unavailable")
_NEXT = re.compile(r"^test .* \.\.\. |^failures:$|^test result: ", re.M)
_DISK = re.compile(r"No space left on device|os error 28\b|StorageFull")


def _announced(out: str, name: str) -> re.Match | None:
    return re.search(rf"^test {re.escape(name)}(?: - should panic)? \.\.\. ", out, re.M)


def _reported_ok(out: str, name: str) -> bool:
    """libtest announced `name` and its status (the last word before the next announcement,
    whatever the test itself wrote in between) is `ok`."""
    m = _announced(out, name)
    if m is None:
        return False
    nxt = _NEXT.search(out, m.end())
    status = out[m.end():nxt.start() if nxt else len(out)].rstrip()
    return status.endswith("ok") and not status.endswith("FAILED")


def limit_hit(res: ProcResult, limits: Limits) -> str | None:
    """Which run limit ended the run, if one did."""
    if res.returncode == 128 + signal.SIGXCPU:
        return "cpu_time"
    if res.returncode == 128 + signal.SIGXFSZ:
        return "output" if max(res.out_bytes, res.err_bytes) >= limits.fsize_mb << 20 else "disk"
    text = res.stdout + res.stderr
    if res.disk_full or _DISK.search(text):
        return "disk"
    if _MEMORY.search(text):
        return "memory"
    if _THREADS.search(text):
        return "threads"
    return None


def run_verdict(res: ProcResult, prog: Program, limits: Limits) -> tuple[str, str]:
    """(verdict, reason) of one test run; see the module docstring."""
    if res.timed_out:
        return "timeout", "test_timeout"
    out = res.stdout
    summaries = _SUMMARY.findall(out)
    if res.returncode == 0:
        if len(summaries) != 1 or summaries[0][0] != "ok" or summaries[0][2] != "0" \
                or not _reported_ok(out, prog.sentinel):
            return "test_failure", "harness_bypassed"
        if not all(_reported_ok(out, name) for name in prog.expected):
            return "test_failure", "tests_missing"
        return "pass", ""
    limit = limit_hit(res, limits)
    if limit:
        return "resource_limit", limit
    if res.returncode == 101 and summaries and summaries[-1][0] == "FAILED":
        return "test_failure", "test_failed"
    return "test_failure", "crashed"
