"""What the benchmark runs: model shapes, the naive recipe and the presets as configs, a random
checkpoint of a given shape, and real text as tokens."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = str(ROOT / "conf")
GPU_PRESETS = ["consumer_24gb", "a100_80gb", "h100", "h200"]
SPEED_PRESETS = ("h200", "h100")
MEMORY_PRESET = "consumer_24gb"
DATASHEET_TFLOPS = 989.0  # H100/H200 SXM dense bf16

SHAPES = {
    "8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "3b": dict(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab=128256),
    "1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256),
    "small": dict(hidden=1024, intermediate=2816, layers=2, heads=8, kv_heads=4, vocab=4096),
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512),
}


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------- the configs
def compose_preset(preset: str, overrides: list[str] | None = None):
    """The RunConfig `python -m sigil_exp hardware=<preset>` would build."""
    from hydra import compose, initialize_config_dir

    from sigil_exp.config import to_object

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_object(compose(config_name="config", overrides=[f"hardware={preset}", *(overrides or [])]))


def naive_config(micro_batch: int):
    """The naive recipe as most QLoRA scripts write it, on the project's default model/quant/LoRA."""
    from sigil_exp.config import HardwareConfig

    cfg = compose_preset("h100")
    cfg.hardware = HardwareConfig(
        name="naive", device="cuda", precision="bf16", micro_batch_size=micro_batch, grad_accum=1,
        gradient_checkpointing=True, checkpointing_reentrant=True, attn_implementation="sdpa",
        optimizer="paged_adamw_8bit", dataloader_workers=0, packing=False, liger_kernel=False, upcast_non_lora=True,
        torch_compile=False, gpu_memory_gb=None, lora_fused=False, auto_micro_batch=False, preflight=True,
        adapter_dtype="bfloat16")  # under autocast: trl's default for quantised bases
    return cfg


def row_config(spec: dict[str, Any]):
    cfg = naive_config(spec["micro_batch"] or 1) if spec["recipe"] == "naive" else compose_preset(spec["recipe"])
    if spec.get("overrides"):  # ablation rows: one lever of the preset reverted
        ov = dict(spec["overrides"])
        if "lora.dropout" in ov:
            cfg.lora.dropout = float(ov.pop("lora.dropout"))
        cfg.hardware = replace(cfg.hardware, **ov)
    hw = cfg.hardware
    if spec["tiny"]:  # the CPU stand-ins for what only exists on CUDA; everything else as configured
        from sigil_exp.config import _dtype_of, cpu_precision

        cfg.hardware = replace(hw, device="cpu", liger_kernel=False, optimizer="adamw_torch", gpu_memory_gb=None,
                               auto_micro_batch=False, precision=cpu_precision())
        cfg.quant.compute_dtype = _dtype_of(cfg.hardware.precision)
    cfg.train.max_steps = spec["loss_steps"] or 1
    cfg.model.max_seq_len = spec["seq"]
    return cfg


# ------------------------------------------------------------------------ model, data, FLOPs
def build_random_model(shape: dict[str, int], out_dir: Path, device: str = "cpu") -> Path:
    """A Llama of `shape` with random bf16 weights, saved like a checkpoint (no download).
    On "cuda" the 8B init takes seconds instead of minutes on the CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out_dir / "config.json").is_file():
        return out_dir
    t0 = time.perf_counter()
    config = LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=1, pad_token_id=2, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(out_dir)
    del model
    gc.collect()
    _log(f"built random model {shape} in {time.perf_counter() - t0:.0f}s -> {out_dir}")
    return out_dir


def _corpus_texts(max_chars: int) -> tuple[list[str], str]:
    """Real text: the bundled Rust corpus, topped up with Python's standard-library sources."""
    import sysconfig

    from sigil_exp.paths import resolve

    texts, total, sources = [], 0, []
    rust = resolve("pkg://assets/rust_sample.jsonl")
    if rust.is_file():
        with rust.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    t = rec.get("text") or (rec.get("prompt", "") + rec.get("gen", ""))
                    if t:
                        texts.append(t)
                        total += len(t)
        sources.append(f"{rust.name} ({total} chars)")
    if total < max_chars:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        n0 = total
        for f in sorted(stdlib.glob("*.py")):
            try:
                t = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            texts.append(t)
            total += len(t)
            if total >= max_chars:
                break
        sources.append(f"python stdlib *.py ({total - n0} chars)")
    return texts, " + ".join(sources)


def real_text_tokens(n_tokens: int, vocab: int) -> tuple[list[int], str]:
    """`n_tokens` ids of real text from a byte-level BPE (vocab <= model vocab) trained on it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts, source = _corpus_texts(max_chars=max(200_000, n_tokens * 6))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 16384), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    ids: list[int] = []
    eos = tok.token_to_id("<eos>")
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
        if len(ids) >= n_tokens:
            break
    while len(ids) < n_tokens:  # small corpus: repeat it
        ids.extend(ids[: n_tokens - len(ids)])
    return ids[:n_tokens], source


def _fname(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
