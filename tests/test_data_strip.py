"""Test code is removed exactly: nothing after a test-only construct is lost (rustc still
compiles what compiled before), bare `#[test]`-style functions go too, and `tests: strip|drop`
mean the same for source files, {prompt, gen} pairs, {text} and {messages} records."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_data import data_cfg, make_tokenizer, write_jsonl

from sigil_exp.config import FilterConfig, SourceConfig
from sigil_exp.data import build_datasets, rust, strip
from sigil_exp.data.filters import filter_record, handle_tests
from sigil_exp.data.sources import Record

# Every construct marked TEST is test-only; everything else is used by `uses_all`, so rustc fails
# on the stripped file if any of it went missing.
LIB = '''//! Crate docs.
#![allow(dead_code, unused_imports)]
use std::collections::HashMap;

#[cfg(test)]
const fn only_in_tests_TEST() -> u32 { 1 }

pub const fn real_const_fn() -> u32 { 2 }

#[cfg(test)]
pub(crate) const unsafe fn unsafe_TEST() -> u32 { 1 }

pub fn after() -> u32 { real_const_fn() }

pub struct Config {
    pub a: u32,
    #[cfg(test)]
    pub probe_TEST: HashMap<String, Vec<u8>>,
    pub b: HashMap<u8, u16>,
    #[cfg(test)] #[doc = "x"] pub(crate) default: u8,
    c: fn(u8) -> u8,
}

pub struct Pair(pub u8, #[cfg(test)] pub HashMap<u8, u8>, pub u16);

pub enum E {
    A,
    #[cfg(test)]
    T_TEST { x: u8 },
    B(u8),
}

#[cfg(test)]
static COUNTER_TEST: u32 = 0;
pub static REAL: u32 = 3;

#[cfg(test)]
type Alias_TEST = HashMap<u8, u8>;
pub type Real = HashMap<u8, u8>;

#[cfg(test)]
use std::fmt::Debug as Debug_TEST;
use std::fmt::Display;

#[cfg(test)]
impl Config { fn probe_TEST(&self) -> u32 { 1 } }
impl Config { pub fn b_len(&self) -> usize { self.b.len() + self.a as usize + (self.c)(1) as usize } }

#[cfg(test)]
macro_rules! tmac_TEST { () => { 1 } }
macro_rules! rmac { () => { 2 } }

#[cfg(test)]
mod helpers_TEST;
pub mod inner { pub fn f() -> u32 { 5 } }

mod more_TEST {
    #![cfg(test)]
    fn x() {}
}

/// Doc of a test.
#[test]
fn bare_TEST() { assert_eq!(after(), 2); }

#[should_panic]
#[test]
fn panics_TEST() { panic!() }

pub fn uses_all(c: &Config, e: E, p: Pair) -> u32 {
    let m = match e { E::A => 1, E::B(x) => x as u32, #[cfg(test)] E::T_TEST { x } => x as u32 };
    let _ = (p.0, p.1);
    let d: &dyn Display = &1;
    let _ = d;
    after() + REAL + rmac!() + inner::f() + c.b_len() as u32 + m
}

pub fn mk() -> Config {
    Config { a: 1, #[cfg(test)] probe_TEST: HashMap::new(), b: HashMap::new(), #[cfg(test)] default: 0, c: |x| x }
}

pub fn real_last() -> Real { HashMap::new() }
'''

# Harness attributes from other crates: the original needs tokio/rstest to build, the stripped
# file must not.
HARNESS = '''pub fn add(a: u32, b: u32) -> u32 { a + b }

#[tokio::test(flavor = "multi_thread")]
async fn async_TEST() { assert_eq!(add(1, 1), 2); }

#[rstest]
#[case(1, 2)]
fn param_TEST(#[case] a: u32, #[case] b: u32) { assert!(add(a, b) > 0); }

#[test_case(1 ; "one")]
fn case_TEST(x: u32) { let _ = x; }

pub fn sub(a: u32, b: u32) -> u32 { a - b }
'''


def rustc_ok(code: str, tmp: Path, name: str) -> subprocess.CompletedProcess:
    f = tmp / f"{name}.rs"
    f.write_text(code)
    return subprocess.run(["rustc", "--edition", "2021", "--crate-type", "lib", "--emit=metadata", "-o",
                           str(tmp / f"{name}.rmeta"), str(f)], capture_output=True, text=True, cwd=tmp)


needs_rustc = pytest.mark.skipif(shutil.which("rustc") is None, reason="rustc not installed")


@needs_rustc
def test_stripped_library_still_compiles_and_keeps_every_real_item(tmp_path):
    assert rustc_ok(LIB, tmp_path, "orig").returncode == 0  # cfg(test) off: what rustc keeps
    out, n = strip.strip_test_items(LIB)
    res = rustc_ok(out, tmp_path, "stripped")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "TEST" not in out and n == 18
    real = [line.strip() for line in LIB.splitlines() if "TEST" not in line and "#[cfg(test)]" not in line
            and line.strip() and not line.strip().startswith(("#[test]", "#[should_panic]", "/// Doc of", "#![cfg"))
            and "default" not in line and "fn x()" not in line]
    for line in real:
        if line == "}":
            continue
        if "#[cfg(test)]" not in line:
            assert line in out, line  # every real line survives, whole
    assert "pub b: HashMap<u8, u16>," in out and "c: fn(u8) -> u8," in out
    assert "pub struct Pair(pub u8,  pub u16);" in out
    assert "Config { a: 1,  b: HashMap::new(),  c: |x| x }" in out


@needs_rustc
def test_harness_attributes_are_stripped_outside_cfg_test(tmp_path):
    out, n = strip.strip_test_items(HARNESS)
    assert n == 3 and "TEST" not in out and "pub fn sub" in out and "pub fn add" in out
    res = rustc_ok(out, tmp_path, "harness")
    assert res.returncode == 0, res.stderr[-2000:]
    assert strip.has_bare_test_fns(HARNESS, rust.code_view(HARNESS))
    in_cfg_test = LIB.replace("#[test]", "#[cfg(test)]\n#[test]")
    assert not strip.has_bare_test_fns(in_cfg_test, rust.code_view(in_cfg_test))


def test_exact_output_for_items_after_cfg_test():
    src = ("#[cfg(test)]\nconst fn t() -> u32 { 1 }\nfn a() {}\n#[cfg(test)]\nconst X: u32 = { 1 };\nfn b() {}\n"
           "struct S {\n    a: u8,\n    #[cfg(test)]\n    pub t: Vec<(u8, u8)>,\n    b: u8,\n}\n"
           "#[cfg(test)]\nmod m;\nfn c() {}\n#[cfg(test)]\nstatic S2: [u8; 2] = [1, 2];\nfn d() {}\n")
    out, n = strip.strip_test_items(src)
    assert out == "fn a() {}\nfn b() {}\nstruct S {\n    a: u8,\n    b: u8,\n}\nfn c() {}\nfn d() {}\n"
    assert n == 5
    assert strip.is_test_only("//! Tests.\n#![cfg(test)]\nfn a() {}\n")
    assert not strip.is_test_only("mod t {\n    #![cfg(test)]\n}\nfn a() {}\n")


GEN = "pub fn add(a: u32, b: u32) -> u32 { a + b }\n\n#[test]\nfn adds() { assert_eq!(add(1, 2), 3); }\n\n" \
      "#[cfg(test)]\nmod tests {\n    #[test]\n    fn t() {}\n}\n"


def test_tests_mean_the_same_for_every_record_kind():
    def records():
        return [Record(kind="text", source="s", origin="o", text=GEN, path="src/lib.rs"),
                Record(kind="completion", source="s", origin="o", prompt="Write add.", gen=GEN),
                Record(kind="chat", source="s", origin="o", messages=[
                    {"role": "user", "content": "Write add."}, {"role": "assistant", "content": GEN}])]

    for rec in records():
        kept, stripped = filter_record(rec, FilterConfig(tests="strip"), None)
        code = {"text": lambda r: r.text, "completion": lambda r: r.gen,
                "chat": lambda r: r.messages[1]["content"]}[rec.kind](kept)
        assert stripped == 2 and code.strip() == "pub fn add(a: u32, b: u32) -> u32 { a + b }", rec.kind
    for rec in records():
        assert filter_record(rec, FilterConfig(tests="drop"), None)[0].reason == "tests", rec.kind
    for rec in records():
        kept, stripped = filter_record(rec, FilterConfig(tests="keep"), None)
        assert stripped == 0 and "fn adds" in (kept.text or kept.gen or kept.messages[1]["content"])


@pytest.mark.parametrize(("path", "code", "verdict"), [
    ("tests/integration.rs", "#[test]\nfn it() {}\n", "drop"),
    ("src/foo_test.rs", "use super::*;\n#[tokio::test]\nasync fn it() {}\n", "drop"),
    ("src/tests.rs", "#[test]\nfn it() {}\n", "drop"),
    ("tests/common/mod.rs", "pub fn setup() -> u32 { 1 }\n", "keep"),  # a helper without test attributes
    ("src/t_test.rs", "/// Student's t-test.\npub fn t_test(a: &[f64]) -> f64 { a[0] }\n", "keep"),
    ("src/t_test.rs", "pub fn t_test() -> f64 { 0.0 }\n#[cfg(test)]\nmod tests {\n    #[test]\n    fn t() {}\n}\n",
     "strip"),  # library code with a test module, under a test-like name
    ("src/test.rs", "pub fn assert_valid(x: u32) -> bool { x > 0 }\n", "keep"),  # a crate's public test API
    ("src/lib.rs", "pub fn a() {}\n#[test]\nfn t() {}\n", "strip"),
])
def test_test_paths_need_test_attributes(path, code, verdict):
    out, n, _ = handle_tests(code, path, FilterConfig(tests="strip"))
    got = "drop" if out is None else "strip" if n else "keep"
    assert got == verdict
    if verdict == "keep":
        assert out == code


def test_pairs_and_chat_records_end_to_end(tmp_path):
    tok = make_tokenizer()
    chat = {"messages": [{"role": "user", "content": "Write add."}, {"role": "assistant", "content": GEN}]}
    rows = [{"prompt": f"Write add number {i}.", "gen": GEN} for i in range(3)] + [{"text": GEN + "// t\n"}, chat]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    for fmt in ("completion", "chat"):
        cfg = data_cfg(SourceConfig(path=str(path)), val_fraction=0.0, format=fmt, filters=FilterConfig(tests="strip"))
        b = build_datasets(cfg, tok, 512, 0, str(tmp_path / "cache"), tmp_path / fmt)
        assert b.stats["tests_stripped_items"] == 10 and b.stats["tests_stripped_records"] == 5
        for ids in b.train["input_ids"]:
            text = tok.decode(ids)
            assert "fn adds" not in text and "mod tests" not in text and "pub fn add" in text
        report = json.loads((tmp_path / fmt / "data_stats.json").read_text())
        assert report["sources"][0]["tests_stripped_items"] == 10
    cfg = data_cfg(SourceConfig(path=str(path)), val_fraction=0.0, filters=FilterConfig(tests="drop"))
    with pytest.raises(Exception, match=r"yielded nothing after filters .*tests=5"):
        build_datasets(cfg, tok, 512, 0, str(tmp_path / "cache"))
