"""Bad and tricky inputs: corrupt files stop with one sentence (or are counted under
data.on_error=skip), links are followed once, roles are checked, path rules match components,
overlong records lose nothing when split, and the line/binary rules look at the whole file."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from test_data import data_cfg, make_tokenizer, pair, write_jsonl

from sigil_exp.config import FilterConfig, SigilError, SourceConfig
from sigil_exp.data import build_datasets
from sigil_exp.data.filters import filter_record, path_reason
from sigil_exp.data.format import fit
from sigil_exp.data.sources import Record, RustFile, walk_rust_dir
from sigil_exp.data.walk import skip_pattern


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def build(cfg, tok, tmp_path, max_len=256, run_dir=None):
    return build_datasets(cfg, tok, max_len, 0, str(tmp_path / "cache"), run_dir)


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and "Traceback" not in msg and msg.endswith(".")


# ------------------------------------------------------------------------------ corrupt files
def test_corrupt_parquet_names_the_file_and_skip_counts_it(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": [f"Write f{i}." for i in range(5)], "gen": [f"pub fn f{i}() -> u32 {{ {i} }}" for i in range(5)]}),
                   tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
    cfg = data_cfg(SourceConfig(kind="parquet", path=str(tmp_path / "*.parquet")), val_fraction=0.0)
    with pytest.raises(SigilError) as e:
        build(cfg, tok, tmp_path)
    msg = str(e.value)
    assert "b.parquet is not a readable parquet file" in msg and "data.on_error=skip" in msg and one_sentence(msg)
    b = build(data_cfg(SourceConfig(kind="parquet", path=str(tmp_path / "*.parquet")), val_fraction=0.0,
                       on_error="skip"), tok, tmp_path)
    assert b.stats["drop/corrupt"] == 1 and b.stats["records_kept"] == 5


def test_truncated_gzip_names_file_and_line_and_skip_goes_on(tmp_path, tok):
    rows = "".join(json.dumps(pair(i)) + "\n" for i in range(400)).encode()
    blob = gzip.compress(rows)
    (tmp_path / "a.jsonl.gz").write_bytes(blob[: len(blob) // 2])  # a download cut short
    write_jsonl(tmp_path / "b.jsonl", [pair(i + 1000) for i in range(5)])
    src = SourceConfig(path=str(tmp_path))
    with pytest.raises(SigilError) as e:
        build(data_cfg(src, val_fraction=0.0), tok, tmp_path)
    msg = str(e.value)
    assert "a.jsonl.gz:" in msg and "truncated or corrupt" in msg and "data.on_error=skip" in msg and one_sentence(msg)
    b = build(data_cfg(src, val_fraction=0.0, on_error="skip"), tok, tmp_path)
    assert b.stats["drop/corrupt"] == 1 and 5 < b.stats["records_kept"] < 405  # the readable part + b.jsonl


def test_multi_turn_messages_in_completion_format_and_unknown_roles(tmp_path, tok):
    multi = {"messages": [{"role": "user", "content": "Add."}, {"role": "assistant", "content": "pub fn add() -> u32 { 1 }"},
                          {"role": "user", "content": "Sub."}, {"role": "assistant", "content": "pub fn sub() -> u32 { 2 }"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [pair(1), multi, pair(2)])
    with pytest.raises(SigilError) as e:
        build(data_cfg(SourceConfig(path=str(path))), tok, tmp_path)
    assert "m.jsonl:2 " in str(e.value) and "data.format=chat" in str(e.value) and one_sentence(str(e.value))
    b = build(data_cfg(SourceConfig(path=str(path)), on_error="skip", val_fraction=0.0), tok, tmp_path)
    assert b.stats["drop/malformed"] == 1 and b.stats["records_kept"] == 2
    assert build(data_cfg(SourceConfig(path=str(path)), format="chat", val_fraction=0.0), tok,
                 tmp_path).stats["records_kept"] == 3

    odd = {"messages": [{"role": "human", "content": "Add."}, {"role": "assistant", "content": "fn add() {}"}]}
    path = write_jsonl(tmp_path / "r.jsonl", [pair(1), pair(2), odd])
    with pytest.raises(SigilError) as e:
        build(data_cfg(SourceConfig(path=str(path)), format="chat"), tok, tmp_path)
    assert "r.jsonl:3 " in str(e.value) and "'human'" in str(e.value) and one_sentence(str(e.value))


# ---------------------------------------------------------------------------------- links
def test_symlink_loops_and_second_names_are_read_once(tmp_path, tok):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_jsonl(data / "sub" / "a.jsonl", [pair(i) for i in range(6)])
    (data / "sub" / "loop").symlink_to(data)  # a loop back up the tree
    (data / "again").symlink_to(data / "sub")  # a second name for a folder
    (data / "b.jsonl").symlink_to(data / "sub" / "a.jsonl")  # a second name for a file
    for pattern in (str(data / "**" / "*.jsonl"), str(data)):
        b = build(data_cfg(SourceConfig(path=pattern), val_fraction=0.0, filters=FilterConfig(dedup="none")),
                  tok, tmp_path)
        assert b.stats["records_seen"] == 6 and b.stats["train_records"] == 6, pattern

    crate = tmp_path / "crate"
    (crate / "src").mkdir(parents=True)
    (crate / "Cargo.toml").write_text('[package]\nname = "c"\n')
    (crate / "src" / "lib.rs").write_text("/// Adds.\npub fn add(a: u32, b: u32) -> u32 { a + b }\n" * 8)
    (crate / "src" / "loop").symlink_to(crate)
    (crate / "src" / "alias.rs").symlink_to(crate / "src" / "lib.rs")
    os.link(crate / "src" / "lib.rs", crate / "src" / "hard.rs")
    items = list(walk_rust_dir(SourceConfig(kind="rust_dir", path=str(crate)), 0, []))
    assert [i.origin for i in items if isinstance(i, RustFile)] == ["src/alias.rs"]  # the first name, sorted
    assert sorted(i.reason for i in items if not isinstance(i, RustFile)) == ["non_rust", "same_path", "same_path"]
    b = build(data_cfg(SourceConfig(kind="rust_dir", path=str(crate)), val_fraction=0.0,
                       filters=FilterConfig(dedup="none")), tok, tmp_path, max_len=512)
    assert b.stats["drop/same_path"] == 2 and b.stats["train_records"] == 1


# ----------------------------------------------------------------------------- path rules
@pytest.mark.parametrize(("path", "reason"), [
    ("src/target/mod.rs", None), ("src/vendor/mod.rs", None), ("src/degenerated.rs", None),
    ("src/stats/t_test.rs", None), ("src/test.rs", None), ("src/examples/mod.rs", None),
    ("vendor/dep/src/lib.rs", "skip_path"), ("target/debug/build/x/out/a.rs", "skip_path"),
    ("src/generated/a.rs", "skip_path"), ("src/foo_generated.rs", "skip_path"), ("crates/a/node_modules/x.rs", "skip_path"),
    ("benches/b.rs", "benches"), ("examples/e.rs", "examples"),
])
def test_path_rules_match_components(path, reason):
    f = FilterConfig(tests="strip", drop_benches=True, drop_examples=True)
    assert path_reason(path, f) == reason


def test_skip_paths_patterns():
    assert skip_pattern("a/build-x86/out.rs", ["build-*/"]) == "build-*/"
    assert skip_pattern("a/b/c/x.rs", ["b/c/"]) == "b/c/" and skip_pattern("a/c/b/x.rs", ["b/c/"]) is None
    assert skip_pattern("src/bindings.pb.rs", ["*.pb.rs"]) == "*.pb.rs" and skip_pattern("src/pb.rs", ["*.pb.rs"]) is None
    assert skip_pattern("src/Generated.rs", ["generated"]) == "generated"


# -------------------------------------------------------------------------- overlong records
@pytest.mark.parametrize("k", [1, 2, 3])
def test_split_of_k_times_max_len_plus_one_keeps_eos(k):
    max_len = 16
    n = k * max_len + 1
    ids = list(range(1000, 1000 + n))
    mask = [0] * 5 + [1] * (n - 5)  # a 5-token prompt, the last id is the EOS
    pieces, outcome = fit(ids, mask, 5, max_len, "split")
    assert outcome == "split" and all(len(p[0]) <= max_len for p in pieces)
    assert pieces[-1][0][-1] == ids[-1] and pieces[-1][1][-1] == 1  # the EOS is there and trained
    # every loss token is predicted exactly once: the trained positions (not a piece's first) cover them
    trained = [t for p_ids, p_mask in pieces for t, m in zip(p_ids[1:], p_mask[1:], strict=True) if m]
    assert trained == [t for t, m in zip(ids, mask, strict=True) if m]


def test_split_stats_and_loss_tokens(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "pub fn a() -> u32 { 1 }\n" * 40}])
    b = build(data_cfg(SourceConfig(path=str(path)), val_fraction=0.0, format="text"), tok, tmp_path, max_len=32)
    s = b.stats
    assert s["overlong_split"] == 1 and s["overlong_chunks"] == s["train_examples"] > 1
    total = sum(len(ids) for ids in b.train["input_ids"])
    # one record: all its tokens but the BOS are trained once; each continuation chunk repeats one token
    assert s["train_loss_tokens"] == total - 1 - (s["overlong_chunks"] - 1)
    assert all(m[0] == 0 for m in b.train["completion_mask"])


def test_each_sequence_is_its_own_records_tokens_in_the_mixed_order(tmp_path, tok):
    """Records are tokenised shortest first (the tokenizer's word cache works better) and put back in
    order: every row decodes to the record its origin names, and the mixed order is kept."""
    rows = [pair(i, gen_len=(i * 7) % 23 + 1) for i in range(300)]  # lengths out of order
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = data_cfg(SourceConfig(path=str(path)), val_fraction=0.1, num_proc=2)
    b = build(cfg, tok, tmp_path, max_len=1024)
    for split, ds in (("train", b.train), ("eval", b.eval)):
        origins = b.origins[split]["origin"]
        assert len(origins) == len(ds) > 10
        for ids, origin in zip(ds["input_ids"], origins, strict=True):
            i = int(origin.rsplit(":", 1)[1]) - 1  # d.jsonl:<line>
            assert tok.decode(ids, skip_special_tokens=True).strip().endswith(rows[i]["gen"].strip()), (split, origin)
    lines = [int(o.rsplit(":", 1)[1]) for o in b.origins["train"]["origin"]]
    assert lines != sorted(lines) and lines != sorted(lines, key=lambda n: len(rows[n - 1]["gen"]))


# ----------------------------------------------------------------------- line and byte rules
def rec(text: str) -> Record:
    return Record(kind="text", source="s", origin="o", text=text)


def test_long_lines_are_counted_not_fatal():
    f = FilterConfig(max_line_chars=100, max_long_line_share=0.1)
    badge = "//! [![crates.io](https://img.shields.io/crates/v/x.svg)](" + "x" * 200 + ")\n"
    code = "".join(f"pub fn f{i}(a: u32) -> u32 {{ a + {i} }}\n" for i in range(30))
    assert isinstance(filter_record(rec(badge + code), f, None)[0], Record)  # one long doc line
    table = "pub static T: [u8; 64] = [" + ", ".join(["1"] * 64) + "];\n"
    assert isinstance(filter_record(rec(table + code), f, None)[0], Record)  # 1 of 31 lines
    assert filter_record(rec(table * 10 + code), f, None)[0].reason == "long_lines"  # 10 of 40: a data table
    assert filter_record(rec(table), f, None)[0].reason == "long_lines"  # minified: all long
    strict = FilterConfig(max_line_chars=100, max_long_line_share=0.0)
    assert filter_record(rec(table + code), strict, None)[0].reason == "long_lines"


def test_binary_detected_beyond_the_first_8kb(tmp_path):
    from sigil_exp.data.filters import read_rust_file

    body = "pub fn f() -> u32 { 1 }\n" * 1000  # 24 KB of text, then a NUL
    p = tmp_path / "x.rs"
    p.write_bytes(body.encode() + b"\x00\x01")
    item = RustFile(abspath=str(p), origin="x.rs", path="x.rs", crate=None, source="s")
    assert read_rust_file(item, FilterConfig())[0].reason == "binary"
    assert filter_record(rec(body + "\x00"), FilterConfig(), None)[0].reason == "binary"
    assert Path(p).stat().st_size > 8192
