"""The bundled Rust corpus (sigil_exp/assets/rust_sample.jsonl) must be well-formed and compile.

Every record's ``gen`` is a standalone edition-2021, std-only library snippet. To keep this fast,
all snippets are wrapped as ``mod s0 { ... } mod s1 { ... } ...`` in one file and compiled once;
the same file is then built with ``--test`` and its embedded ``#[cfg(test)]`` tests are run.
Only when the combined build fails are snippets compiled one by one to name the culprit.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REQUIRED_KEYS = ("prompt", "gen", "_task_type", "_source", "_source_crate", "_source_file", "_split")
TASK_TYPES = {"code_generation", "transformations", "error_fixing", "explanations"}
MIN_RECORDS = 100
TEST_ATTR = re.compile(r"^\s*#\[test\]\s*$", re.MULTILINE)


def _sample_path() -> Path:
    try:
        import sigil_exp

        pkg_file = getattr(sigil_exp, "__file__", None)  # None for a namespace package
        if pkg_file:
            candidate = Path(pkg_file).parent / "assets" / "rust_sample.jsonl"
            if candidate.exists():
                return candidate
    except ImportError:
        pass
    return Path(__file__).resolve().parents[1] / "sigil_exp" / "assets" / "rust_sample.jsonl"


def _rustc() -> str | None:
    found = shutil.which("rustc")
    if found:
        return found
    fallback = Path.home() / ".cargo" / "bin" / "rustc"
    return str(fallback) if fallback.exists() else None


@pytest.fixture(scope="module")
def records() -> list[dict]:
    path = _sample_path()
    assert path.exists(), f"missing corpus: {path}"
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:  # pragma: no cover - failure path
                    pytest.fail(f"{path}:{lineno}: invalid JSON: {e}")
    return out


@pytest.fixture(scope="module")
def rustc() -> str:
    exe = _rustc()
    if exe is None:
        pytest.skip("rustc not found on PATH")
    return exe


def _label(i: int, rec: dict) -> str:
    first = rec.get("prompt", "").strip().splitlines()
    return f"record {i} ({rec.get('_source_file')}): {first[0][:100] if first else '<empty prompt>'}"


def _wrap_all(records: list[dict]) -> str:
    return "".join(f"mod s{i} {{\n{rec['gen']}\n}}\n" for i, rec in enumerate(records))


def _run_rustc(rustc: str, src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        rustc,
        "--edition",
        "2021",
        "--crate-type",
        "lib",
        "--cap-lints",
        "allow",
        *extra,
        "-o",
        str(out),
        str(src),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _find_failing(rustc: str, records: list[dict], tmp_path: Path, *extra: str) -> list[str]:
    """Compile each snippet on its own and describe those that fail."""
    single = tmp_path / "single"
    single.mkdir(exist_ok=True)

    def one(i: int) -> str | None:
        src = single / f"s{i}.rs"
        src.write_text(records[i]["gen"], encoding="utf-8")
        proc = _run_rustc(rustc, src, single / f"s{i}.out", *extra)
        if proc.returncode == 0:
            return None
        return f"{_label(i, records[i])}\n{proc.stderr[-2000:]}"

    with ThreadPoolExecutor(max_workers=4) as pool:
        return [msg for msg in pool.map(one, range(len(records))) if msg]


def test_schema(records):
    assert len(records) >= MIN_RECORDS, f"only {len(records)} records"
    for i, rec in enumerate(records):
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        assert not missing, f"{_label(i, rec)} missing keys {missing}"
        for k in REQUIRED_KEYS:
            assert isinstance(rec[k], str) and rec[k].strip(), (
                f"{_label(i, rec)}: {k} must be a non-empty str"
            )
        assert rec["_task_type"] in TASK_TYPES, f"{_label(i, rec)}: bad _task_type {rec['_task_type']!r}"
        assert rec["_source"] == "sigil_exp_sample"
        assert rec["_split"] == "train"
        assert "#![" not in rec["gen"] and "extern crate" not in rec["gen"], _label(i, rec)
    assert {r["_task_type"] for r in records} == TASK_TYPES


def test_distinct(records):
    def norm(s: str) -> str:
        return " ".join(s.split())

    for key in ("gen", "prompt"):
        seen: dict[str, int] = {}
        for i, rec in enumerate(records):
            j = seen.setdefault(norm(rec[key]), i)
            assert j == i, f"duplicate {key}: records {j} and {i}"


def test_gens_compile(records, rustc, tmp_path):
    src = tmp_path / "all.rs"
    src.write_text(_wrap_all(records), encoding="utf-8")
    proc = _run_rustc(rustc, src, tmp_path / "liball.rlib")
    if proc.returncode != 0:
        failing = _find_failing(rustc, records, tmp_path)
        detail = "\n\n".join(failing) if failing else proc.stderr[-4000:]
        pytest.fail(f"{len(failing)} snippet(s) fail to compile:\n{detail}")


def test_embedded_tests_pass(records, rustc, tmp_path):
    src = tmp_path / "all_tests.rs"
    src.write_text(_wrap_all(records), encoding="utf-8")
    binary = tmp_path / "all_tests"
    proc = _run_rustc(rustc, src, binary, "--test")
    if proc.returncode != 0:
        failing = _find_failing(rustc, records, tmp_path, "--test")
        detail = "\n\n".join(failing) if failing else proc.stderr[-4000:]
        pytest.fail(f"{len(failing)} snippet(s) fail to build with --test:\n{detail}")

    run = subprocess.run([str(binary), "-q"], capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"embedded Rust tests failed:\n{output[-6000:]}"

    expected = sum(len(TEST_ATTR.findall(rec["gen"])) for rec in records)
    passed = sum(int(n) for n in re.findall(r"test result: ok\. (\d+) passed", output))
    assert expected > 0
    assert passed == expected, (
        f"expected {expected} tests to pass, harness reported {passed}:\n{output[-2000:]}"
    )


def test_gens_compile_after_their_tests_are_stripped(records, rustc, tmp_path):
    """data.filters.tests=strip on the real pairs: every test is gone and what is left compiles."""
    from sigil_exp.config import FilterConfig
    from sigil_exp.data import rust, strip
    from sigil_exp.data.filters import handle_tests

    stripped, n_items = [], 0
    for rec in records:
        gen, n, _ = handle_tests(rec["gen"], rec["_source_file"], FilterConfig(tests="strip"))
        assert gen is not None and not strip.has_test_code(rust.code_view(gen)), _label(len(stripped), rec)
        stripped.append({**rec, "gen": gen})
        n_items += n
    assert n_items >= sum(1 for rec in records if TEST_ATTR.search(rec["gen"])) > 0
    src = tmp_path / "stripped.rs"
    src.write_text(_wrap_all(stripped), encoding="utf-8")
    proc = _run_rustc(rustc, src, tmp_path / "libstripped.rlib")
    if proc.returncode != 0:
        failing = _find_failing(rustc, stripped, tmp_path)
        pytest.fail(f"{len(failing)} stripped snippet(s) fail to compile:\n" + "\n\n".join(failing or [proc.stderr[-4000:]]))
