"""Verdicts that cannot be gamed, and batching that never changes one.

The first part needs no rustc: the program a sample compiles to (program.py) and the verdict
read from a run (verdict.py), on hand-written libtest outputs, genuine and forged. The second
runs hostile and mutated completions on bundled problems through both paths (batched crates and
one rustc per sample) in one execute() call each: every verdict, reason and error-code set must
be identical, and every attack must fail with its own reason. About 25 s on 2 cores.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from sigil_exp.evaluate.bench import HOSTILE, SLOW_MACRO, bench_samples, hostile_samples
from sigil_exp.evaluate.execute import ExecConfig, Sample, execute
from sigil_exp.evaluate.problems import load_problems
from sigil_exp.evaluate.program import batch_safe, build_program, harden_tests, libtest_names
from sigil_exp.evaluate.sandbox import ProcResult, detect_sandbox, run_limits
from sigil_exp.evaluate.verdict import run_verdict

needs_rustc = pytest.mark.skipif(shutil.which("rustc") is None and not Path("~/.cargo/bin/rustc").expanduser().exists(),
                                 reason="rustc is not installed")
PROMPT = "/// Adds two numbers.\nfn add(a: i32, b: i32) -> i32 {\n"
TEST = "#[cfg(test)]\nmod tests {\n    use super::*;\n\n    #[test]\n    fn test_add() {\n        assert_eq!(add(1, 2), 3);\n    }\n}\n"


# ------------------------------------------------------------------------------ the program
def test_expected_test_names_come_from_the_test_source():
    test = """#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn plain() { assert!(true); }
    #[test]
    #[should_panic(expected = "boom")]
    pub fn panics() { panic!("boom") }
    #[test]
    #[ignore]
    fn skipped() {}
    mod inner {
        #[test] fn deep() {}
    }
    // #[test] fn in_a_comment() {}
    const S: &str = "#[test] fn in_a_string() {}";
}
#[test]
fn top_level() {}
"""
    assert libtest_names(test) == ["tests::plain", "tests::panics", "tests::inner::deep", "top_level"]
    multipl_e = "}\n\nfn main() {\n    let candidate = has_zero;\n    assert!(candidate(vec![0]));\n}\n"
    assert libtest_names(harden_tests(multipl_e, "sigil_std_x")) == ["main"]  # main runs as a libtest test


def test_std_macros_in_tests_go_through_the_private_alias():
    test = 'mod tests {\n    #[test]\n    fn t() {\n        assert_eq!(f(), vec![1]);\n        std::assert!(x, "assert_eq!(a, b)");\n        ::core::panic!("x");\n        my::assert!(y);\n    }\n}\n'
    out = harden_tests(test, "sigil_std_ab")
    assert "::sigil_std_ab::assert_eq!(f(), ::sigil_std_ab::vec![1])" in out
    assert '::sigil_std_ab::assert!(x, "assert_eq!(a, b)")' in out  # string contents untouched
    assert "::sigil_std_ab::panic!" in out and "my::assert!(y)" in out  # other paths untouched


@pytest.mark.parametrize("completion, safe", [
    ("    a + b\n}\n", True),
    ("    crate::add(a, b - 1) + 1\n}\n", True),  # rewritten to crate::sigil_s00000::add
    ("    let s = \"super:: extern no_mangle\";\n    a + b\n}\n", False),  # conservative: any mention
    ("    a + b\n}\n#[no_mangle]\npub extern \"C\" fn f() {}\n", False),
    ("    std::arch::global_asm!(\"\");\n    a + b\n}\n", False),
    ("    a + b\n}\n#[link_section = \".init_array\"]\nstatic X: u8 = 0;\n", False),
    ("    a + b\n}\nextern crate self as core;\n", False),
    ("    super::add(a, b)\n}\n", False),
    ("    #![allow(unused)]\n    a + b\n}\n", False),
    ("    a + b\n}\n#[deny(warnings)]\nfn g() {}\n", False),
    ("    a + b\n}\nuse crate as root;\n", False),  # `crate` not as a path start
    ("    (a + b\n}\n", False),  # unbalanced: its token trees would reach into a crate-mate
    ("    " + "(" * 80 + "a + b" + ")" * 80 + "\n}\n", False),  # nested deeper than rustc's stack likes
    ("    std::panic::Location::caller();\n    a + b\n}\n", False),
    ("    a + b\n}\nfn sigil_s00001() {}\n", False),
])
def test_batch_safe(completion, safe):
    assert batch_safe(PROMPT, completion, TEST) is safe


def test_module_form_rewrites_crate_paths_in_code_only():
    completion = '    // crate::add in a comment\n    let s = "crate::x";\n    crate::add(a, b - 1) + 1 + s.len() as i32 * 0\n}\n'
    prog = build_program(PROMPT, completion, TEST, "sigil_std_ab", "sigil_s00003")
    assert "crate::sigil_s00003::add(a, b - 1)" in prog.text
    assert '"crate::x"' in prog.text and "// crate::add in a comment" in prog.text
    assert prog.expected == ("sigil_s00003::tests::test_add",) and prog.filter == "sigil_s00003::"
    assert prog.sentinel.startswith("sigil_s00003::\u03c9sigil_") and prog.sentinel > max(prog.expected)


def test_the_sentinel_sorts_after_every_name_the_sample_could_give_a_test():
    completion = "    a + b\n}\n#[test]\nfn \u03c9\u03c9zz() {}\n"
    prog = build_program(PROMPT, completion, TEST, "sigil_std_ab", None)
    assert prog.sentinel > "\u03c9\u03c9zz" and prog.sentinel > "tests::test_add"
    assert prog.text.rstrip().endswith("extern crate std as sigil_std_ab;")


# ------------------------------------------------------------------------------ the verdict
def _run(stdout: str, rc: int = 0, **kw) -> ProcResult:
    return ProcResult(returncode=rc, timed_out=False, stdout=stdout, stderr=kw.pop("stderr", ""), wall_s=0.1, **kw)


PROG = build_program(PROMPT, "    a + b\n}\n", TEST, "sigil_std_ab", None)
S = PROG.sentinel
OK = f"\nrunning 2 tests\ntest tests::test_add ... ok\ntest {S} ... ok\n\ntest result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s\n\n"
LIMITS = run_limits(10.0)


@pytest.mark.parametrize("name, run, expected", [
    ("genuine", _run(OK), ("pass", "")),
    ("writes to fd 1 mid-test", _run(OK.replace("test_add ... ok", "test_add ... xx\nyy ok")), ("pass", "")),
    ("exit(0) inside the test", _run("\nrunning 2 tests\ntest tests::test_add ... "), ("test_failure", "harness_bypassed")),
    ("forged ok + summary", _run("\nrunning 2 tests\ntest tests::test_add ... ok\n\ntest result: ok. 2 passed; 0 failed; "
                                 "0 ignored; 0 measured; 0 filtered out; finished in 0.00s\n"), ("test_failure", "harness_bypassed")),
    ("a second summary", _run(OK + "test result: ok. 9 passed; 0 failed;\n"), ("test_failure", "harness_bypassed")),
    ("tests cfg'd out", _run(f"\nrunning 1 test\ntest {S} ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; "
                             "0 measured; 0 filtered out; finished in 0.00s\n"), ("test_failure", "tests_missing")),
    ("a failing test", _run(OK.replace("test_add ... ok", "test_add ... FAILED").replace("result: ok. 2 passed; 0", "result: FAILED. 1 passed; 1"),
                            rc=101), ("test_failure", "test_failed")),
    ("abort", _run("", rc=134, stderr="thread 'x' has overflowed its stack"), ("test_failure", "crashed")),
    ("allocation failure", _run("", rc=134, stderr="memory allocation of 1073741824 bytes failed"), ("resource_limit", "memory")),
    ("thread spawn refused", _run("failed to spawn thread: Os { code: 11, kind: WouldBlock }", rc=101), ("resource_limit", "threads")),
    ("stdout over the cap", _run("xx", rc=153, out_bytes=64 << 20), ("resource_limit", "output")),
    ("a file over the cap", _run("xx", rc=153, out_bytes=10), ("resource_limit", "disk")),
    ("private dir full", _run("", rc=101, disk_full=True), ("resource_limit", "disk")),
    ("cpu time", _run("", rc=152), ("resource_limit", "cpu_time")),
])
def test_run_verdict(name, run, expected):
    assert run_verdict(run, PROG, LIMITS) == expected


# ------------------------------------------------------------------------------ with rustc
EXPECTED = {  # hostile completion -> (verdict, reason), whatever path it takes
    "exit0": ("test_failure", "harness_bypassed"), "panic_hook_exit0": ("test_failure", "harness_bypassed"),
    "trailing_cfg_any": ("test_failure", "tests_missing"), "shadowed_asserts": ("test_failure", "test_failed"),
    "core_redirected": ("test_failure", "test_failed"), "forged_summary": ("test_failure", "harness_bypassed"),
    "forged_test_lines": ("test_failure", "harness_bypassed"), "asm_constructor": ("test_failure", "harness_bypassed"),
    "link_section_constructor": ("test_failure", "harness_bypassed"), "read_own_binary": ("test_failure", "test_failed"),
    "read_sources": ("test_failure", "test_failed"),
    "crate_path": ("pass", ""), "dollar_crate_path": ("pass", ""),
}
MULTIPL_E_PROMPT = "fn has_zero(v: Vec<i32>) -> bool {\n"
MULTIPL_E_TEST = ("}\n\nfn main() {\n    let candidate = has_zero;\n    assert_eq!(candidate(vec![1, 0]), true);\n"
                  "    assert_eq!(candidate(vec![1]), false);\n}\n")
MULTIPL_E = {"    v.contains(&0)\n}\n": ("pass", ""), "    false\n}\n": ("test_failure", "test_failed"),
             "    std::process::exit(0)\n}\n": ("test_failure", "harness_bypassed")}
ISOLATED = {"core_redirected", "asm_constructor", "link_section_constructor"}  # never share a crate


@pytest.fixture(scope="module")
def both_paths():
    """Hostile completions on one problem (the slow bench test runs them on two), mutated ones
    on three more, and a few that must not share a crate; batched and naive."""
    problems = load_problems("pkg://assets/rust_problems.jsonl")
    samples = hostile_samples([problems[0]]) + bench_samples([problems[i] for i in (22, 38, 55)], 5)
    samples.append(Sample.of(problems[0], "    use crate::sum_of_odd_squares as _;\n"
                             + problems[0].canonical_solution + "// extern: forces the root form\n", 99))
    p = problems[0]  # samples that must not share a crate, each for its own reason
    samples += [Sample.of(p, "    let _ = line!();\n    v.iter().filter(|x| *x % 2 != 0).map(|x| x * x).sum()\n}\n", 7),
                Sample.of(p, "    #![allow(unused)]\n    v.iter().map(|x| x * x).sum()\n}\n", 8),
                Sample.of(p, "    super::helper()\n}\nfn helper() -> i64 { 0 }\n", 9),
                Sample.of(p, "    0\n}}\n", 10)]  # an extra brace: not self-contained
    samples += [Sample("multipl_e", "multipl_e", MULTIPL_E_PROMPT, body, MULTIPL_E_TEST, k)
                for k, body in enumerate(MULTIPL_E)]
    sb = detect_sandbox("auto")
    fast = execute(samples, ExecConfig(timeout_s=5.0, batch_size=32), sb)
    naive = execute(samples, ExecConfig(timeout_s=5.0, batch_size=1), sb)
    return samples, fast, naive, sb


@needs_rustc
def test_batching_never_changes_a_verdict(both_paths):
    samples, fast, naive, _ = both_paths
    diff = {(s.task_id, s.category, s.sample_idx): ((a.verdict, a.reason, a.error_codes), (b.verdict, b.reason, b.error_codes))
            for s, a, b in zip(samples, fast, naive, strict=True) if (a.verdict, a.reason, a.error_codes)
            != (b.verdict, b.reason, b.error_codes)}
    assert diff == {}
    assert {r.verdict for r in fast} >= {"pass", "test_failure", "compile_error"}
    paths = {r.path for r in fast}
    assert paths == {"batch", "isolated"} and {r.path for r in naive} == {"alone", "isolated"}


@needs_rustc
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_attack_fails_with_its_reason(both_paths, name):
    samples, fast, _, sb = both_paths
    got = [(r.verdict, r.reason, r.path, r.stderr[-200:]) for s, r in zip(samples, fast, strict=True) if s.category == f"hostile/{name}"]
    if name == "read_own_binary" and not sb.drop_uid:
        pytest.skip("without a sandbox uid the test binary belongs to the caller, who may read it")
    assert len(got) == 1
    for verdict, reason, path, tail in got:
        assert (verdict, reason) == EXPECTED[name], tail
        assert (path == "isolated") == (name in ISOLATED)


@needs_rustc
def test_multipl_e_tests_run_under_libtest_too(both_paths):
    """MultiPL-E asserts in `fn main()`: run as a libtest test, so `process::exit(0)` fails there too."""
    samples, fast, _, _ = both_paths
    got = [(r.verdict, r.reason) for s, r in zip(samples, fast, strict=True) if s.category == "multipl_e"]
    assert got == list(MULTIPL_E.values())


@needs_rustc
def test_crate_paths_pass_batched_as_alone_and_at_the_root(both_paths):
    samples, fast, naive, _ = both_paths
    for s, a, b in zip(samples, fast, naive, strict=True):
        if s.category in ("hostile/crate_path", "hostile/dollar_crate_path") or s.sample_idx == 99:
            assert (a.verdict, b.verdict) == ("pass", "pass"), a.stderr
            assert a.path == ("isolated" if s.sample_idx == 99 else "batch")


@needs_rustc
@pytest.mark.slow
def test_a_slow_build_costs_one_crate_build_plus_its_samples():
    """A crate whose rustc fails for no module's error (here: over its time budget, a macro that
    expands 2^28 times) is not split log2(n) times: each of its samples is compiled alone, once.
    About 12 s."""
    problems = load_problems("pkg://assets/rust_problems.jsonl", 7)
    samples = [Sample.of(p, p.canonical_solution) for p in problems]
    samples.insert(3, Sample.of(problems[0], SLOW_MACRO + problems[0].canonical_solution, 1))
    lines: list[str] = []
    results = execute(samples, ExecConfig(timeout_s=5.0, compile_timeout_s=3.0, workers=1), detect_sandbox("auto"),
                      progress=lines.append)
    assert [(r.verdict, r.reason) for r in results] == [("pass", "")] * 3 + [("timeout", "compile_timeout")] + [("pass", "")] * 4
    runs = int(re.search(r"\((\d+) rustc runs\)", lines[-1]).group(1))
    assert runs == 1 + len(samples)  # one crate attempt, then each sample alone


@needs_rustc
def test_a_rustc_crash_is_its_samples_compile_error():
    """Deep nesting overflows rustc's stack: never in a shared crate, and a `rustc_crash`."""
    problems = load_problems("pkg://assets/rust_problems.jsonl", 1)
    deep = Sample.of(problems[0], "    let _ = " + "[" * 100_000 + "1" + "]" * 100_000 + ";\n" + problems[0].canonical_solution)
    (r,) = execute([deep], ExecConfig(), detect_sandbox("auto"))
    assert (r.verdict, r.reason, r.path) == ("compile_error", "rustc_crash", "isolated")
