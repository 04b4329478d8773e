"""Filters: one record (or one .rs file) in, the kept record or a `Drop(reason)` out.

Drop reasons (each counted in stats as `drop/<reason>`, with example paths in data_stats.json):
  skip_path      path matches data.filters.skip_paths (component rules: walk.py)
  non_rust       not a .rs file (Cargo.lock, Cargo.toml, README, ...), kind=rust_dir only
  same_path      a second name (symlink, hard link) of a file already read, kind=rust_dir
  unreadable     could not be read (permissions, vanished)           binary / non_utf8   what it says
  corrupt        a file that cannot be read to the end: bad parquet, truncated .gz (data.on_error=skip)
  generated      a generator banner (`@generated`, `DO NOT EDIT`) in the first lines
  tests          test code (tests=strip|drop): a `#![cfg(test)]` file, a file at a test path
                 (tests/, *_test.rs, ...) with `#[test]`-style functions outside cfg(test), or
                 (tests=drop only) anything with a test attribute; tests=strip removes the
                 `#[cfg(test)]` items and `#[test]`-style functions of the rest instead (strip.py)
  benches / examples   benches/ or examples/ folders (drop_benches / drop_examples)
  too_short / too_long   outside [min_chars, max_chars] (after stripping tests)
  long_lines     more than max_long_line_share of the lines have code longer than max_line_chars
                 (minified code, data tables; comments do not count, so one long doc line does not drop)
  undocumented   prefer_documented and no doc comment (///, //!, /** */)
  not_idiomatic  prefer_idiomatic and idiomatic/low-quality marker ratio < min_idiomatic_ratio
  malformed      unusable JSON line / row (data.on_error=skip)
  duplicate_exact / duplicate_near   removed by dedup (dedup.py)
Test handling is the same for every record kind: a source file ({text}), the `gen` of a
{prompt, gen} pair, the assistant turns of a {messages} record. The other file-level filters
(generated, long_lines, quality) apply to source files; pairs and chat records get the quality
filters on their code when filters.quality_on_pairs is set (never for task_type=explanations).
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

from sigil_exp.config import FilterConfig
from sigil_exp.data import rust, strip
from sigil_exp.data.sources import Drop, Record, RustFile
from sigil_exp.data.walk import in_tool_dir, skip_pattern, test_convention

_MAYBE_TEST = re.compile(r"test|bench|quickcheck")  # every test attribute holds one of these words


def path_reason(path: str, f: FilterConfig) -> str | None:
    """Why a file at this (crate- or repo-relative) path is dropped, or None (test paths are
    decided with the content: handle_tests)."""
    if skip_pattern(path, f.skip_paths) is not None:
        return "skip_path"
    if f.drop_benches and in_tool_dir(path, "benches"):
        return "benches"
    if f.drop_examples and in_tool_dir(path, "examples"):
        return "examples"
    return None


def handle_tests(code: str, path: str | None, f: FilterConfig, view: str | None = None
                 ) -> tuple[str | None, int, str | None]:
    """Apply data.filters.tests to one piece of Rust: (code, test constructs stripped, its code
    view or None when not computed); code None = drop the record as test code."""
    if f.tests == "keep" or not _MAYBE_TEST.search(code):
        return code, 0, view
    view = view if view is not None else rust.code_view(code)
    if not strip.has_test_code(view):
        return code, 0, view
    if f.tests == "drop" or strip.is_test_only(code, view):
        return None, 0, view
    if path is not None and test_convention(path) and strip.has_bare_test_fns(code, view):
        return None, 0, view
    code, n = strip.strip_test_items(code, view)
    return code, n, None


def _long_lines(text: str, f: FilterConfig, view: str | None) -> bool:
    """More than max_long_line_share of the non-blank lines hold code (comments not counted)
    longer than max_line_chars."""
    if not f.max_line_chars or max(map(len, text.split("\n"))) <= f.max_line_chars:
        return False
    lines = (view if view is not None else rust.code_view(text)).split("\n")
    long = sum(1 for line in lines if len(line.rstrip()) > f.max_line_chars)
    total = sum(1 for line in text.split("\n") if line.strip())
    return long > f.max_long_line_share * total


def normalise(text: str) -> str:
    """Content used for the dedup/split hash: line endings, trailing spaces and blank edges ignored."""
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).strip("\n")


def content_key(rec: Record) -> str:
    if rec.kind == "text":
        body = normalise(rec.text)
    elif rec.kind == "completion":
        body = normalise(rec.prompt) + "\0" + normalise(rec.gen)
    else:
        body = "\0".join(m["role"] + "\x01" + normalise(m["content"]) for m in rec.messages)
    return hashlib.sha1(body.encode("utf-8", "surrogatepass")).hexdigest()


def code_of(rec: Record) -> str:
    if rec.kind == "text":
        return rec.text
    if rec.kind == "completion":
        return rec.gen
    return next(m["content"] for m in reversed(rec.messages) if m["role"] == "assistant")


def _pair_tests(rec: Record, f: FilterConfig) -> int | None:
    """handle_tests on the code of a {prompt, gen} or chat record, in place: test constructs
    stripped, or None when the record is to be dropped as test code."""
    stripped = 0
    if rec.kind == "completion":
        gen, stripped, _ = handle_tests(rec.gen, rec.path, f)
        if gen is None:
            return None
        rec.gen = gen
        return stripped
    for m in rec.messages:
        if m["role"] == "assistant":
            content, n, _ = handle_tests(m["content"], rec.path, f)
            if content is None:
                return None
            m["content"], stripped = content, stripped + n
    return stripped


# ------------------------------------------------------------------------------------ MinHash
NUM_PERM = 128
_MASK32 = np.uint64(0xFFFFFFFF)
_PERM_A = np.random.default_rng(1234).integers(1, 2**63, NUM_PERM, dtype=np.uint64) | np.uint64(1)
_PERM_B = np.random.default_rng(5678).integers(0, 2**63, NUM_PERM, dtype=np.uint64)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|[^\sA-Za-z0-9_]")


def minhash(text: str, ngram: int) -> np.ndarray:
    """128-permutation MinHash (uint32) of the set of `ngram`-token shingles of `text`."""
    toks = np.fromiter((zlib.crc32(t.encode()) for t in _WORD.findall(text)), dtype=np.uint64)
    if toks.size == 0:
        return np.full(NUM_PERM, 0xFFFFFFFF, dtype=np.uint32)
    k = min(ngram, toks.size)
    n = toks.size - k + 1
    sh = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):  # polynomial combination of k consecutive token hashes (wraps mod 2^64)
            sh = sh * np.uint64(0x100000001B3) + toks[j:j + n]
        sh = np.unique(sh)
        sig = np.full(NUM_PERM, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, sh.size, 2048):  # multiply-shift hashing, in blocks to bound memory
            block = sh[start:start + 2048, None] * _PERM_A[None, :] + _PERM_B[None, :]
            np.minimum(sig, (block >> np.uint64(32)).min(axis=0), out=sig)
    return (sig & _MASK32).astype(np.uint32)


# ------------------------------------------------------------------------------------ filters
def _length_reason(code: str, f: FilterConfig) -> str | None:
    if len(code.strip()) < f.min_chars:
        return "too_short"
    if len(code) > f.max_chars:
        return "too_long"
    return None


def _quality_reason(code: str, view: str, f: FilterConfig) -> str | None:
    if f.prefer_documented and not rust.has_doc_comment(code):
        return "undocumented"
    if f.prefer_idiomatic and rust.idiomatic_ratio(code, view) < f.min_idiomatic_ratio:
        return "not_idiomatic"
    return None


def filter_record(rec: Record, f: FilterConfig, minhash_ngram: int | None) -> tuple[Record | Drop, int]:
    """Apply every filter to one record: (kept record with key/signature set, or Drop; number of
    test items stripped)."""
    if rec.path is not None:
        reason = path_reason(rec.path, f)
        if reason:
            where = rec.origin if rec.origin.endswith(rec.path) else f"{rec.origin} ({rec.path})"
            return Drop(reason, where), 0
    stripped = 0
    if rec.kind == "text":
        text = rec.text.lstrip("\ufeff")
        if "\x00" in text:
            return Drop("binary", rec.origin), 0
        if rust.looks_generated(text):
            return Drop("generated", rec.origin), 0
        kept, stripped, view = handle_tests(text, rec.path, f)
        if kept is None:
            return Drop("tests", rec.origin), 0
        text = kept
        if view is None and f.prefer_idiomatic:
            view = rust.code_view(text)
        reason = _length_reason(text, f)
        if reason is None and _long_lines(text, f, view):
            reason = "long_lines"
        reason = reason or _quality_reason(text, view or "", f)
        if reason:
            return Drop(reason, rec.origin), 0
        rec.text = text
    else:
        stripped = _pair_tests(rec, f)
        if stripped is None:
            return Drop("tests", rec.origin), 0
        code = code_of(rec)
        reason = _length_reason(code, f)
        if reason is None and f.quality_on_pairs and rec.task_type != "explanations":
            reason = _quality_reason(code, rust.code_view(code) if f.prefer_idiomatic else "", f)
        if reason:
            return Drop(reason, rec.origin), 0
    rec.key = content_key(rec)
    if minhash_ngram:
        rec.signature = minhash(code_of(rec) if rec.kind != "completion" else rec.prompt + "\n" + rec.gen,
                                minhash_ngram)
    return rec, stripped


def read_rust_file(item: RustFile, f: FilterConfig) -> tuple[Record | Drop, int]:
    """Read one .rs file found by the rust_dir walk: (Record or Drop, bytes read). Path filters
    were applied to its walk-relative path; filter_record checks the crate-relative one."""
    try:
        with open(item.abspath, "rb") as fh:
            head = fh.read(f.max_chars * 4 + 1)  # a UTF-8 char is at most 4 bytes
    except OSError:
        return Drop("unreadable", item.origin), 0
    if len(head) > f.max_chars * 4:
        return Drop("too_long", item.origin), len(head)
    if b"\x00" in head:
        return Drop("binary", item.origin), len(head)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return Drop("non_utf8", item.origin), len(head)
    return Record(kind="text", text=text, source=item.source, origin=item.origin, path=item.path,
                  crate=item.crate, meta={"crate": item.crate, "path": item.path}, n_bytes=len(head)), len(head)
