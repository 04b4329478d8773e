"""Packing and the loss mask on the trainer `train()` builds: the project's `sft_config` (packing,
completion-only loss), trl's own collator, datasets from `build_datasets`, the tiny model's tokenizer.

The first training batch is taken from that trainer. Documents are found by their BOS token and
identified by their prompt text, and the expected labels come from the raw record (the tokens of its
`gen` text plus EOS), not from the completion_mask under test. A document's logits must be the same
packed and alone (no attention across documents)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sigil_exp import model as modeling
from sigil_exp.config import DataConfig, QuantConfig, SourceConfig
from sigil_exp.data import build_datasets
from sigil_exp.train import sft_config
from tests.conftest import smoke_cfg

MAX_LEN = 160
TEXT = "pub fn zero() -> u8 {\n    0\n}\n"


def pair(i: int, gen_len: int) -> dict:
    return {"prompt": f"Write function number {i} in Rust.", "gen": f"pub fn f{i}() -> u32 {{ {i} }}\n" * gen_len,
            "_task_type": "code_generation"}


RECORDS = [pair(i, gen_len=1 + i % 2) for i in range(24)] + [{"text": TEXT}]


@pytest.fixture(scope="module")
def setup(cache_dir, tmp_path_factory):
    """(tokenizer, datasets, an fp32 copy of the tiny model with SDPA, the first training batch)."""
    from trl import SFTTrainer

    tmp = tmp_path_factory.mktemp("packing")
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = smoke_cfg(cache_dir, f"model.max_seq_len={MAX_LEN}")
    cfg.data = DataConfig(name="pack", sources=[SourceConfig(path=str(tmp / "d.jsonl"))], val_fraction=0.0,
                          num_proc=1, cache=False)
    tok = modeling.load_tokenizer(cfg.model)
    data = build_datasets(cfg.data, tok, cfg.model.max_seq_len, cfg.train.seed, cache_dir)
    # fp32 weights so "packed == alone" can be checked to 1e-4; the attention path (SDPA) is the run's
    model = modeling.load_base_model(cfg.model, QuantConfig(method="none", compute_dtype="float32"), cfg.hardware)
    model.eval()
    trainer = SFTTrainer(model=model, args=sft_config(cfg, tmp / "run", data.eval is not None),
                         train_dataset=data.train, eval_dataset=data.eval, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    return tok, data, model, batch


def documents(batch, bos: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document that starts in the batch (at its BOS token)."""
    ids = batch["input_ids"]
    out = []
    for row in range(ids.shape[0]):
        starts = (ids[row] == bos).nonzero().flatten().tolist()
        for s, e in zip(starts, [*starts[1:], ids.shape[1]], strict=True):
            out.append((row, s, e))
    return out


def test_packed_documents_do_not_attend_to_each_other(setup):
    tok, _, model, batch = setup
    docs = documents(batch, tok.bos_token_id)
    assert len(docs) >= 4, "the batch should pack several documents"
    assert any(s > 0 for _, s, _ in docs), "no document shares a row with another: nothing is tested"

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits
        as_one_sequence = model(input_ids=batch["input_ids"], use_cache=False).logits
        worst = leaked = 0.0
        for row, s, e in docs:
            alone = model(input_ids=batch["input_ids"][row, s:e][None], use_cache=False).logits[0]
            worst = max(worst, (packed[row, s:e] - alone).abs().max().item())
            leaked = max(leaked, (as_one_sequence[row, s:e] - alone).abs().max().item())
    print(f"{len(docs)} packed documents: max |packed - alone| = {worst:.2e}; causal-only control = {leaked:.2e}")
    assert leaked > 1e-2, "control: without per-document masking the logits must differ"
    assert worst < 1e-4, f"packed logits differ from the document alone by {worst}: cross-document attention"


def _record_of(tok, ids: list[int]) -> dict:
    text = tok.decode(ids, skip_special_tokens=True)
    hits = [r for r in RECORDS if ("prompt" in r and r["prompt"] in text) or ("text" in r and text.strip() == r["text"].strip())]
    assert len(hits) == 1, f"cannot tell which record this document is: {text!r}"
    return hits[0]


def test_loss_is_on_the_gen_text_and_eos_only(setup):
    tok, _, _, batch = setup
    ids, labels = batch["input_ids"], batch["labels"]
    checked = {"pair": 0, "text": 0}
    for row, s, e in documents(batch, tok.bos_token_id):
        doc = ids[row, s:e].tolist()
        rec = _record_of(tok, doc)
        if "gen" in rec:  # completion format: only the gen tokens and the EOS after them carry loss
            target = tok(rec["gen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert doc[-len(target):] == target, "the document does not end with its gen text + EOS"
            assert re.search(r"number \d+ in Rust", tok.decode(doc[:-len(target)])), "the prompt comes first"
            expected = [-100] * (len(doc) - len(target)) + target
            checked["pair"] += 1
        else:  # raw text: every token after BOS is learned
            assert doc[-1] == tok.eos_token_id
            expected = [-100] + doc[1:]
            checked["text"] += 1
        assert labels[row, s:e].tolist() == expected, tok.decode(doc)
    assert checked["pair"] >= 4 and checked["pair"] + checked["text"] == len(documents(batch, tok.bos_token_id))


def test_each_record_is_one_training_sequence(setup):
    tok, data, _, _ = setup
    seen = [_record_of(tok, list(r["input_ids"])) for r in data.train]
    assert sorted(map(json.dumps, seen)) == sorted(map(json.dumps, RECORDS))
