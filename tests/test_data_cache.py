"""The processed-dataset cache: a hit skips preprocessing, a write is atomic, the key follows
the tokenizer and the config."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_data import build, data_cfg, make_tokenizer, pair, write_jsonl

from sigil_exp.config import SourceConfig
from sigil_exp.data import cache


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()

# ----------------------------------------------------------------------------------- cache
def test_cache_hit_skips_preprocessing(tmp_path, tok, monkeypatch):
    import sigil_exp.data as data_mod

    path = write_jsonl(tmp_path / "d.jsonl", [pair(i) for i in range(30)])
    cfg = data_cfg(SourceConfig(path=str(path)), cache=True)
    first = build(cfg, tok, tmp_path)
    assert first.stats["cache_hit"] is False

    def boom(*a, **k):
        raise AssertionError("re-tokenised on a cache hit")

    monkeypatch.setattr(data_mod, "_tokenize", boom)
    monkeypatch.setattr(data_mod, "_collect_source", boom)
    second = build(cfg, tok, tmp_path, run_dir=tmp_path / "run2")
    assert second.stats["cache_hit"] is True and second.train["input_ids"] == first.train["input_ids"]
    assert json.loads((tmp_path / "run2" / "data_stats.json").read_text())["stats"]["cache_hit"] is True
    with pytest.raises(AssertionError, match="re-tokenised"):  # a different max_seq_len is a new key
        build(cfg, tok, tmp_path, max_len=128)
    monkeypatch.undo()
    path.write_text(path.read_text() + json.dumps(pair(99)) + "\n")  # the source changed: a new key
    assert build(cfg, tok, tmp_path).stats["cache_hit"] is False


def test_cache_write_is_atomic(tmp_path, tok, monkeypatch):
    import datasets

    path = write_jsonl(tmp_path / "d.jsonl", [pair(i) for i in range(10)])
    cfg = data_cfg(SourceConfig(path=str(path)), cache=True, val_fraction=0.0)
    real_save = datasets.Dataset.save_to_disk

    def half_then_fail(self, target, *a, **k):
        real_save(self, target, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", half_then_fail)
    bundle = build(cfg, tok, tmp_path)  # the run goes on without the cache ...
    assert len(bundle.train) == 10 and not bundle.stats["cache_hit"]
    assert list((tmp_path / "cache" / "datasets").iterdir()) == []  # ... and nothing half-written is left
    monkeypatch.undo()
    assert build(cfg, tok, tmp_path).stats["cache_hit"] is False  # no broken entry was trusted


def test_cache_key_depends_on_tokenizer_vocab(tok):
    other = make_tokenizer(vocab_size=400)
    a, b = cache.tokenizer_identity(tok), cache.tokenizer_identity(other)
    assert a["vocab_hash"] != b["vocab_hash"]
    cfg = data_cfg(SourceConfig(path="x.jsonl"))
    key = cache.cache_key(cfg, a, 256, 0, ["f"])
    assert key != cache.cache_key(replace(cfg, val_fraction=0.5), a, 256, 0, ["f"])
    assert key == cache.cache_key(replace(cfg, num_proc=2), a, 256, 0, ["f"])  # same output, same entry
