"""Build the tiny local Llama (`model=tiny`): random weights and a byte-level BPE trained offline
on the bundled Rust corpus, saved with `save_pretrained` so it loads through exactly the path a
real checkpoint takes (`from_pretrained` + BitsAndBytesConfig). Nothing is downloaded."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from sigil_exp.config import SigilError, TinyModelConfig
from sigil_exp.paths import resolve

log = logging.getLogger(__name__)

CORPUS = "pkg://assets/rust_sample.jsonl"
SPEC_FILE = "sigil_tiny.json"  # the build_tiny settings the folder was built with
SPECIAL = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|finetune_right_pad_id|>"}
EXTRA_SPECIAL = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# The Llama 3 instruct template, so `data.format=chat` exercises the same path as the real model.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _corpus_texts() -> list[str]:
    texts = []
    with resolve(CORPUS).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                texts.append(rec.get("prompt", "") + "\n" + rec.get("gen", rec.get("text", "")))
    return texts


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the bundled corpus, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL["bos"], SPECIAL["eos"], SPECIAL["pad"], *EXTRA_SPECIAL]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_texts(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
        additional_special_tokens=EXTRA_SPECIAL,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_tiny(out_dir: str | Path, cfg: TinyModelConfig) -> Path:
    """Create the tiny model + tokenizer in `out_dir` (atomically: a crash leaves nothing half-built)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir).expanduser()
    spec = json.dumps(asdict(cfg), sort_keys=True)
    if (out / "config.json").is_file():
        built = (out / SPEC_FILE).read_text() if (out / SPEC_FILE).is_file() else None
        if built is not None and built != spec:
            raise SigilError(f"model.name_or_path={out_dir} holds a tiny model built with other model.build_tiny "
                             "settings; delete that folder or point model.name_or_path somewhere new.")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("Building the tiny Llama in %s (random weights, tokenizer trained on the bundled corpus)", out)
    tokenizer = build_tokenizer(cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        rope_theta=500000.0, initializer_range=cfg.initializer_range,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(spec)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
