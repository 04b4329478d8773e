"""Data pipeline: sources, filters on a hand-made tree, dedup, mixing, formats, overlong
handling, split stability, bad input, configs; the helpers the other test_data_*.py files share.
Rust analysis and real crates: test_data_rust.py; test stripping: test_data_strip.py; tricky
inputs: test_data_inputs.py; cache: test_data_cache.py; preview: test_data_preview.py; packing
and attention: test_data_packing.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sigil_exp.config import DataConfig, FilterConfig, SigilError, SourceConfig
from sigil_exp.data import build_datasets, mix
from sigil_exp.data.filters import minhash, read_rust_file
from sigil_exp.data.format import encode, encode_prompt, fit, render_prompt
from sigil_exp.data.sources import Record, RustFile, walk_rust_dir

REPO = Path(__file__).resolve().parents[1]
REGISTRY = Path("/usr/share/cargo/registry")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SNIPPETS = [
    "fn main() { println!(\"hello\"); }",
    "pub fn add(a: i32, b: i32) -> i32 { a + b }",
    "impl Iterator for Counter { type Item = u32; fn next(&mut self) -> Option<u32> { None } }",
    "#[derive(Debug, Clone)]\npub struct Point { x: f64, y: f64 }",
    "let v: Vec<_> = xs.iter().map(|x| x * 2).filter(|x| *x > 3).collect();",
    "match value { Some(x) => x, None => return Err(Error::Missing) }",
    "/// Parses the input.\npub fn parse(s: &str) -> Result<u32, ParseIntError> { s.trim().parse() }",
    "Write a Rust function that reverses a string.",
]


def make_tokenizer(vocab_size: int = 512):
    """A tiny byte-level BPE with Llama-3-like special tokens and chat template (offline, ~0.1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"]
    tok.train_from_iterator(SNIPPETS * 20, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                 pad_token=specials[2], additional_special_tokens=specials[3:])
    hf.chat_template = CHAT_TEMPLATE
    return hf


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pair(i: int, task: str = "code_generation", gen_len: int = 1) -> dict:
    return {"prompt": f"Write function number {i} in Rust.", "gen": f"pub fn f{i}() -> u32 {{ {i} }}\n" * gen_len,
            "_task_type": task, "_source": "pipeline", "_source_crate": f"crate{i % 3}",
            "_source_file": f"src/f{i}.rs", "_split": "train"}


def data_cfg(*sources: SourceConfig, **kw) -> DataConfig:
    kw.setdefault("num_proc", 1)
    kw.setdefault("cache", False)
    return DataConfig(name="test", sources=list(sources), **kw)


def build(cfg, tok, tmp_path, max_len=256, seed=0, run_dir=None):
    return build_datasets(cfg, tok, max_len, seed, str(tmp_path / "cache"), run_dir)


# ----------------------------------------------------------------------------- hand-made Rust
LIB_RS = '''//! A tiny demo crate.

/// Adds two numbers.
pub fn add(a: i32, b: i32) -> Result<i32, String> {
    let total = [a, b].iter().map(|x| x * 1).sum();
    Ok(total)
}

/// A raw string with a hash and braces must not confuse the stripper.
pub const BANNER: &str = r##"mod tests { "# } #[cfg(test)] "##;
pub const CLOSE: char = '}';

impl Default for Config {
    fn default() -> Self {
        match 1 { _ => Config {} }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const RAW: &str = r##"}} "# {{ #[cfg(test)] "##;
    /* a { comment */
    #[test]
    fn adds() {
        let s = "}";
        assert_eq!(add(1, 2).unwrap(), 3, "{}", s);
    }
}

pub struct Config {}
'''

BAD_RS = '''pub fn messy() {
    // TODO: fix this
    // FIXME: and this
    let x: Option<u32> = None;
    println!("{}", x.unwrap());
    dbg!(x.unwrap());
    unsafe { std::ptr::null::<u8>().read() };
}
'''


def make_tree(root: Path) -> Path:
    files = {
        "Cargo.toml": '[package]\nname = "demo"\nversion = "0.1.0"\n',
        "Cargo.lock": "# lock\n",
        "README.md": "# demo\n",
        "src/lib.rs": LIB_RS,
        "src/bad.rs": BAD_RS,
        "src/gen.rs": "// @generated by build.rs, do not edit\npub const X: u32 = 1;\n" * 3,
        "src/tiny.rs": "fn a(){}\n",
        "src/zz_dup.rs": LIB_RS.replace("\n", "   \n"),  # same code, trailing spaces: exact duplicate
        "tests/integration.rs": "#[test]\nfn it_works() { assert_eq!(demo::add(1, 1).unwrap(), 2); }\n",
        "benches/bench.rs": "fn bench_add() { for i in 0..1000 { let _ = demo::add(i, i); } }\n",
        "examples/demo.rs": "fn main() { let total = demo::add(1, 2); let _ = total; }\n",
        "vendor/dep/src/lib.rs": "pub fn vendored() -> u32 { 42 }\n",
        "target/debug/build/out.rs": "pub fn built() -> u32 { 42 }\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (root / "src/binary.rs").write_bytes(b"fn x() {}\x00\x01\x02" * 10)
    (root / "src/latin1.rs").write_bytes("// caf\xe9 au lait, long enough to pass\nfn y() {}\n".encode("latin-1"))
    (root / "src/ghost.rs").symlink_to(root / "does-not-exist.rs")  # unreadable (root ignores chmod)
    return root


def test_rust_dir_filters_hand_made_tree(tmp_path, tok):
    root = make_tree(tmp_path / "proj")
    f = FilterConfig(tests="strip", drop_benches=True, drop_examples=True, prefer_idiomatic=True)
    cfg = data_cfg(SourceConfig(kind="rust_dir", path=str(root)), filters=f, val_fraction=0.0)
    bundle = build(cfg, tok, tmp_path, max_len=4096, run_dir=tmp_path / "run")
    s = bundle.stats
    expected = {"non_rust": 3, "skip_path": 2, "tests": 1, "benches": 1, "examples": 1, "generated": 1,
                "binary": 1, "non_utf8": 1, "unreadable": 1, "too_short": 1, "duplicate_exact": 1,
                "not_idiomatic": 1}
    assert {k[5:]: v for k, v in s.items() if k.startswith("drop/")} == expected
    assert s["records_kept"] == 1 and s["tests_stripped_items"] == 1
    report = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    ex = report["drop_examples"]
    assert any("vendor/dep/src/lib.rs" in e for e in ex["skip_path"]) and any("target/" in e for e in ex["skip_path"])
    assert ex["tests"] == ["tests/integration.rs"] and ex["binary"] == ["src/binary.rs"]
    text = tok.decode(bundle.train[0]["input_ids"])
    assert "pub struct Config" in text and "fn adds" not in text and 'mod tests { "#' in text


def test_rust_dir_records_carry_crate_and_relative_path(tmp_path):
    root = make_tree(tmp_path / "mono" / "crates" / "demo")
    src = SourceConfig(kind="rust_dir", path=str(tmp_path / "mono"))
    items = [i for i in walk_rust_dir(src, 0, FilterConfig().skip_paths) if isinstance(i, RustFile)]
    lib = next(i for i in items if i.origin.endswith("src/lib.rs"))
    assert (lib.crate, lib.path, lib.origin) == ("demo", "src/lib.rs", "crates/demo/src/lib.rs")
    rec, n_bytes = read_rust_file(lib, FilterConfig())
    assert n_bytes == len(LIB_RS.encode()) and isinstance(rec, Record) and rec.meta == {"crate": "demo", "path": "src/lib.rs"}
    assert root.is_dir()


# ------------------------------------------------------------------------------ JSON sources
def test_sigilderg_jsonl_completion_format_and_metadata_not_fed(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [pair(i) for i in range(20)])
    bundle = build(data_cfg(SourceConfig(path=str(path)), val_fraction=0.0), tok, tmp_path)
    row = bundle.train[0]
    text = tok.decode(row["input_ids"])
    assert text.startswith("<|begin_of_text|>Write function number") and text.endswith("<|end_of_text|>")
    assert "_task_type" not in text and "code_generation" not in text and "pipeline" not in text
    loss_text = tok.decode([t for t, m in zip(row["input_ids"], row["completion_mask"], strict=True) if m])
    assert loss_text.startswith("pub fn f") and loss_text.endswith("<|end_of_text|>") and "Write" not in loss_text
    assert bundle.stats["task/code_generation"] == 20


def test_train_and_eval_prompt_tokens_match(tok):
    rec = Record(kind="completion", source="s", origin="o", prompt="Reverse a string.", gen="fn r() {}")
    for fmt in ("completion", "chat"):
        ids, mask, plen = encode(rec, fmt, tok)
        prompt_ids = encode_prompt(rec.prompt, fmt, tok)
        assert ids[:len(prompt_ids)] == prompt_ids and mask.index(1) == len(prompt_ids) == plen
        assert tok.decode(prompt_ids, skip_special_tokens=False).endswith(render_prompt(rec.prompt, fmt, tok))


def test_chat_format_loss_on_assistant_turns_only(tmp_path, tok):
    msgs = [{"role": "system", "content": "You write Rust."}, {"role": "user", "content": "Add."},
            {"role": "assistant", "content": "fn add() {}"}, {"role": "user", "content": "Now sub."},
            {"role": "assistant", "content": "fn sub() {}"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    cfg = data_cfg(SourceConfig(path=str(path)), format="chat", val_fraction=0.0, filters=FilterConfig(min_chars=5))
    row = build(cfg, tok, tmp_path).train[0]
    ids, mask = row["input_ids"], row["completion_mask"]
    loss = tok.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    assert loss == "fn add() {}<|eot_id|>fn sub() {}<|eot_id|><|end_of_text|>"
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|begin_of_text|><|start_header_id|>system")


def test_text_format_and_raw_text_records(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "pub fn a() -> u32 { 1 }"}, pair(1)])
    b = build(data_cfg(SourceConfig(path=str(path)), format="text", val_fraction=0.0), tok, tmp_path)
    for row in b.train:
        assert row["completion_mask"][0] == 0 and all(row["completion_mask"][1:])  # all but BOS


def test_parquet_source_with_path_column(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"content": ["pub fn a() -> u32 { 1 + 2 + 3 }", "pub fn v() -> u32 { 42 + 42 }"],
                      "max_stars_repo_path": ["src/a.rs", "vendor/x/src/v.rs"]})
    pq.write_table(table, tmp_path / "p.parquet")
    b = build(data_cfg(SourceConfig(kind="parquet", path=str(tmp_path)), val_fraction=0.0), tok, tmp_path)
    assert b.stats["records_kept"] == 1 and b.stats["drop/skip_path"] == 1


def test_hf_sources_offline(tmp_path):
    """HF_HUB_OFFLINE=1 in a fresh process: a save_to_disk folder and a local json folder load; a
    hub id that is not cached fails with one sentence naming the key and the fix."""
    script = f"""
import json, datasets
from sigil_exp.config import SourceConfig, SigilError
from sigil_exp.data.sources import iter_hf
datasets.Dataset.from_dict({{"content": ["fn a() {{}}", "fn b() {{}}"]}}).save_to_disk({str(tmp_path / 'saved')!r})
out = {{"saved": [r.text for r in iter_hf(SourceConfig(kind="hf", path={str(tmp_path / 'saved')!r}), 0, "raise")]}}
out["streamed"] = [r.text for r in iter_hf(SourceConfig(kind="hf", path={str(tmp_path / 'saved')!r}, streaming=True), 0, "raise")]
(__import__("pathlib").Path({str(tmp_path / 'js')!r})).mkdir()
open({str(tmp_path / 'js' / 'train.jsonl')!r}, "w").write(json.dumps({{"prompt": "p", "gen": "g"}}) + "\\n")
out["local"] = [r.kind for r in iter_hf(SourceConfig(kind="hf", path={str(tmp_path / 'js')!r}), 0, "raise")]
try:
    list(iter_hf(SourceConfig(kind="hf", path="nobody-here/no-such-dataset-42"), 3, "raise"))
except SigilError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["saved"] == out["streamed"] == ["fn a() {}", "fn b() {}"] and out["local"] == ["completion"]
    err = out["error"]
    assert "data.sources.3.path='nobody-here/no-such-dataset-42'" in err and "HF_HUB_OFFLINE=1" in err
    assert err.count(". ") == 0 and "\n" not in err  # one sentence


# ------------------------------------------------------------------------------- bad input
def test_malformed_line_names_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", [pair(0), pair(1), "{not json", pair(3), {"foo": 1}])
    with pytest.raises(SigilError, match=r"bad\.jsonl:3 .*data\.on_error=skip"):
        build(data_cfg(SourceConfig(path=str(path))), tok, tmp_path)
    b = build(data_cfg(SourceConfig(path=str(path)), on_error="skip", val_fraction=0.0), tok, tmp_path,
              run_dir=tmp_path / "run")
    assert b.stats["drop/malformed"] == 2 and b.stats["records_kept"] == 3
    ex = json.loads((tmp_path / "run" / "data_stats.json").read_text())["drop_examples"]["malformed"]
    assert ex[0].endswith("bad.jsonl:3") and ex[1].endswith("bad.jsonl:5")


def test_empty_source_stops_with_counts(tmp_path, tok):
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": "x"}, {"text": "y"}])
    with pytest.raises(SigilError, match=r"data\.sources\.0 .*yielded nothing after filters .*too_short=2"):
        build(data_cfg(SourceConfig(path=str(path))), tok, tmp_path)
    with pytest.raises(SigilError, match=r"data\.sources\.0\.path=.*does not exist"):
        build(data_cfg(SourceConfig(path=str(tmp_path / "nope.jsonl"))), tok, tmp_path)


def test_unknown_task_weight_key_fails(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [pair(i) for i in range(5)])
    with pytest.raises(SigilError, match="data.task_weights names error_fixng"):
        build(data_cfg(SourceConfig(path=str(path)), task_weights={"error_fixng": 2.0}), tok, tmp_path)


# ------------------------------------------------------------------------- overlong sequences
def test_overlong_split_keeps_prompt_in_first_chunk(tok):
    ids = list(range(100, 130))
    mask = [0] * 10 + [1] * 20
    pieces, outcome = fit(ids, mask, 10, 12, "split")
    assert outcome == "split" and [len(p[0]) for p in pieces] == [12, 12, 8]  # each later piece repeats 1 token
    assert pieces[0][1][:10] == [0] * 10 and [p[1][0] for p in pieces] == [0, 0, 0]
    assert [p[0][0] for p in pieces[1:]] == [ids[11], ids[22]] and pieces[-1][0][-1] == ids[-1]
    assert fit(ids, mask, 10, 12, "truncate") == ([(ids[:12], mask[:12])], "truncated")
    assert fit(ids, mask, 10, 12, "drop") == ([], "dropped")
    assert fit(ids, mask, 10, 8, "split") == ([], "prompt_too_long")


def test_overlong_counted_end_to_end(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [pair(i, gen_len=40) for i in range(4)] + [pair(9)])
    b = build(data_cfg(SourceConfig(path=str(path)), val_fraction=0.0), tok, tmp_path, max_len=64)
    s = b.stats
    assert s["overlong_split"] == 4 and s["train_examples"] == 1 + s["overlong_chunks"] and s["overlong_chunks"] > 4
    assert max(len(r) for r in b.train["input_ids"]) <= 64
    t = build(data_cfg(SourceConfig(path=str(path)), val_fraction=0.0, overlong="truncate"), tok, tmp_path, max_len=64)
    assert t.stats["overlong_truncated"] == 4 and t.stats["train_examples"] == 5


# --------------------------------------------------------------------------- dedup and mixing
def test_minhash_finds_near_duplicates_only():
    base = LIB_RS * 3
    near = base.replace("Adds two numbers.", "Adds two integers.")
    other = BAD_RS * 5
    sims = [np.mean(minhash(base, 5) == minhash(x, 5)) for x in (near, other)]
    assert sims[0] > 0.9 and sims[1] < 0.2


def test_dedup_exact_and_minhash_end_to_end(tmp_path, tok):
    base = LIB_RS * 3
    rows = [{"text": base}, {"text": base + "\n\n"}, {"text": base.replace("two numbers", "two ints")},
            {"text": BAD_RS * 3}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    f = FilterConfig(dedup="minhash")
    s = build(data_cfg(SourceConfig(path=str(path)), filters=f, val_fraction=0.0), tok, tmp_path, max_len=4096).stats
    assert (s["drop/duplicate_exact"], s["drop/duplicate_near"], s["records_kept"]) == (1, 1, 2)


def test_task_weight_sampling_ratios(tmp_path, tok):
    rows = [pair(i, task) for task in ("code_generation", "error_fixing", "explanations") for i in range(60)]
    rows = [dict(r, prompt=r["prompt"] + " " + r["_task_type"]) for r in rows]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tw = {"error_fixing": 2.0, "explanations": 0.5}
    cfg = data_cfg(SourceConfig(path=str(path)), task_weights=tw, val_fraction=0.0)
    s1 = build(cfg, tok, tmp_path, seed=1).stats
    assert (s1["task/code_generation"], s1["task/error_fixing"], s1["task/explanations"]) == (60, 120, 30)
    a = build(cfg, tok, tmp_path, seed=1).train["input_ids"]
    b = build(cfg, tok, tmp_path, seed=1).train["input_ids"]
    c = build(cfg, tok, tmp_path, seed=2).train["input_ids"]
    assert a == b and sorted(map(tuple, a)) != sorted(map(tuple, c))  # deterministic; seed picks the half
    recs = [Record(kind="text", source="s", origin=str(i), text="x", task_type="t") for i in range(1000)]
    assert len(mix.apply_task_weights(recs, {"t": 1.5}, seed=0)) == 1500


def test_source_weights_and_mix_orders():
    def recs(name, n):
        return [Record(kind="text", source=name, origin=f"{name}{i}", text="") for i in range(n)]

    a, b = recs("a", 4), recs("b", 2)
    order = lambda out: "".join(r.source for r in out)  # noqa: E731
    assert order(mix.mix([a, b], [1.0, 1.0], ["a", "b"], "sequential", 0)) == "aaaabb"
    assert order(mix.mix([a, b], [1.0, 1.0], ["a", "b"], "round_robin", 0)) == "ababaa"
    out = mix.mix([a, b], [0.5, 3.0], ["a", "b"], "weighted", 0)
    assert sorted(order(out)) == sorted("aa" + "bbbbbb")


def test_split_is_stable_when_sources_are_added(tmp_path, tok):
    p1 = write_jsonl(tmp_path / "a.jsonl", [pair(i) for i in range(60)])
    p2 = write_jsonl(tmp_path / "b.jsonl", [pair(i + 1000) for i in range(60)])
    one = build(data_cfg(SourceConfig(path=str(p1)), val_fraction=0.2), tok, tmp_path)
    two = build(data_cfg(SourceConfig(path=str(p1)), SourceConfig(path=str(p2)), val_fraction=0.2), tok, tmp_path)
    ev1, ev2 = set(map(tuple, one.eval["input_ids"])), set(map(tuple, two.eval["input_ids"]))
    tr2 = set(map(tuple, two.train["input_ids"]))
    assert ev1 and ev1 <= ev2 and not (ev1 & tr2)
    assert 0 < len(ev1) < 25


def test_parallel_workers_give_the_same_dataset(tmp_path, tok):
    root = make_tree(tmp_path / "proj")
    (root / "src/ghost.rs").unlink()
    cfgs = [data_cfg(SourceConfig(kind="rust_dir", path=str(root)), num_proc=n, val_fraction=0.0) for n in (1, 2)]
    one, two = (build(c, tok, tmp_path) for c in cfgs)
    assert one.train["input_ids"] == two.train["input_ids"]
    assert {k: v for k, v in one.stats.items() if "_s" not in k and k != "num_proc" and "mb_per" not in k} == \
        {k: v for k, v in two.stats.items() if "_s" not in k and k != "num_proc" and "mb_per" not in k}


# --------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("option", sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml")))
def test_data_options_compose_and_validate(option):
    from hydra import compose, initialize_config_dir

    from sigil_exp.config import to_object
    from sigil_exp.validation import validate

    overrides = [f"data={option}"] + (["data.sources.0.path=/x.jsonl"] if option == "jsonl" else [])
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = to_object(compose("config", overrides=overrides))
    validate(cfg)
    assert cfg.data.name == option
    first = (REPO / "conf" / "data" / f"{option}.yaml").read_text().splitlines()
    assert first[0].startswith("# ") and any("python -m sigil_exp" in line for line in first[:5])


def test_phase_experiments_pick_their_data():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        assert compose("config", overrides=["experiment=phase1"]).data.name == "phase1"
        p2 = compose("config", overrides=["experiment=phase2", "train.init_adapter=x"]).data
        assert p2.name == "phase2" and p2.filters.dedup == "minhash" and p2.filters.tests == "strip"


def test_validate_rejects_bad_data_knobs():
    from hydra import compose, initialize_config_dir

    from sigil_exp.config import to_object
    from sigil_exp.validation import validate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for override, key in [("data.sources.0.weight=0", "data.sources.0.weight"),
                              ("+data.task_weights.x=-1", "data.task_weights.x"),
                              ("data.filters.max_chars=5", "data.filters.max_chars")]:
            cfg = to_object(compose("config", overrides=[override]))
            with pytest.raises(SigilError, match=key.replace(".", r"\.")):
                validate(cfg)


def test_drop_reason_examples_are_bounded(tmp_path, tok):
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": "x"}] * 12 + [pair(1)])
    build(data_cfg(SourceConfig(path=str(path)), val_fraction=0.0), tok, tmp_path, run_dir=tmp_path / "r")
    report = json.loads((tmp_path / "r" / "data_stats.json").read_text())
    assert report["sources"][0]["drops"]["too_short"] == 12 and len(report["drop_examples"]["too_short"]) == 5


def test_fast_text_encoder_matches_the_tokenizer(tok):
    from sigil_exp.data.format import text_encoder

    ids_of = text_encoder(tok)
    for text in SNIPPETS + [LIB_RS, "<|eot_id|>x<|end_of_text|>", "é中\t  \n"]:
        assert ids_of(text) == tok(text, add_special_tokens=False)["input_ids"]
