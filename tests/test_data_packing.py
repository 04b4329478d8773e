"""Packed documents must not attend to each other, on the path the trainer takes: our
pre-tokenised dataset -> trl 1.16 SFTTrainer (packing=True: bfd bins, padding-free collator with
per-document position_ids) -> a Llama with SDPA attention. A document's logits are the same packed
and alone, and its labels honour our completion_mask."""

from __future__ import annotations

import json

import pytest
import torch

from sigil_exp.config import DataConfig, SourceConfig
from sigil_exp.data import build_datasets
from sigil_exp.tiny import build_tokenizer

MAX_LEN = 160


def pair(i: int, gen_len: int) -> dict:
    return {"prompt": f"Write function number {i} in Rust.", "gen": f"pub fn f{i}() -> u32 {{ {i} }}\n" * gen_len,
            "_task_type": "code_generation"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("packing")
    tok = build_tokenizer(512)  # the tiny model's tokenizer (byte-level BPE on the bundled corpus)
    rows = [pair(i, gen_len=1 + i % 2) for i in range(24)] + [{"text": "pub fn z() -> u8 { 0 }"}]
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(name="pack", sources=[SourceConfig(path=str(tmp / "d.jsonl"))],
                     val_fraction=0.0, num_proc=1, cache=False)
    bundle = build_datasets(cfg, tok, MAX_LEN, 0, str(tmp / "cache"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, attn_implementation="sdpa",
    )).float().eval()
    return tmp, tok, bundle, model


@pytest.fixture(scope="module")
def batch(setup):
    """The first training batch exactly as SFTTrainer builds it (prepare -> bfd pack -> collate)."""
    from trl import SFTConfig, SFTTrainer

    tmp, tok, bundle, model = setup

    args = SFTConfig(output_dir=str(tmp / "out"), packing=True, max_length=MAX_LEN, completion_only_loss=True,
                     per_device_train_batch_size=2, use_cpu=True, bf16=False, report_to="none", seed=0,
                     dataloader_num_workers=0, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=bundle.train, processing_class=tok)
    return next(iter(trainer.get_train_dataloader()))


def test_packed_documents_do_not_attend_to_each_other(setup, batch):
    model = setup[3]
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # padding-free: one flat row
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
    docs = [(s, e) for s, e in zip(starts[:-1], starts[1:], strict=True) if e - s > 1]
    assert len(docs) >= 4, "the batch should pack several documents"

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        as_one_sequence = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        ids = batch["input_ids"][0]
        worst = 0.0
        leaked = 0.0
        for s, e in docs:
            alone = model(input_ids=ids[s:e][None], use_cache=False).logits[0]
            worst = max(worst, (packed[s:e] - alone).abs().max().item())
            leaked = max(leaked, (as_one_sequence[s:e] - alone).abs().max().item())
    print(f"{len(docs)} packed documents: max |packed - alone| = {worst:.2e}; causal-only control = {leaked:.2e}")
    assert worst < 1e-4, f"packed logits differ from the document alone by {worst}: cross-document attention"
    assert leaked > 1e-2, "control: without per-document masking the logits must differ"


def test_labels_follow_completion_mask_after_packing(setup, batch):
    bundle = setup[2]
    by_ids = {tuple(r["input_ids"]): r["completion_mask"] for r in bundle.train}
    ids, labels, pos = batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [len(ids)]
    checked = 0
    for s, e in zip(starts[:-1], starts[1:], strict=True):
        mask = by_ids.get(tuple(ids[s:e]))
        if mask is None:
            continue  # padding
        expected = [t if m and i > 0 else -100 for i, (t, m) in enumerate(zip(ids[s:e], mask, strict=True))]
        assert labels[s:e] == expected
        checked += 1
    assert checked >= 4
    prompt_tokens = sum(1 for r in bundle.train for m in r["completion_mask"] if m == 0)
    assert prompt_tokens > 0 and json.dumps(bundle.stats)
