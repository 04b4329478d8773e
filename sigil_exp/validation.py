"""Rules no schema can express: allowed choices, value ranges and the rules that span groups,
checked before anything runs (`validate(cfg)`). Each failure is one sentence naming the key and
the fix."""

from __future__ import annotations

import math
import os
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from sigil_exp.config import PRECISION_DTYPE, RunConfig, SigilError

_CHOICES = {
    "quant.method": ("nf4", "fp4", "int8", "none"),
    "quant.compute_dtype": ("bfloat16", "float16", "float32"),
    "quant.quant_storage": ("uint8", "bfloat16"),
    "lora.bias": ("none", "all", "lora_only"),
    "lora.init_weights": ("default", "gaussian", "pissa", "olora"),
    "data.format": ("completion", "text", "chat"),
    "data.mix": ("weighted", "sequential", "round_robin"),
    "data.overlong": ("split", "truncate", "drop"),
    "data.on_error": ("raise", "skip"),
    "data.filters.tests": ("keep", "strip", "drop"),
    "data.filters.dedup": ("none", "exact", "minhash"),
    "hardware.device": ("cuda", "cpu"),
    "hardware.precision": ("bf16", "fp16", "fp32"),
    "hardware.adapter_dtype": ("float32", "bfloat16"),
    "hardware.attn_implementation": ("sdpa", "sdpa_varlen", "eager", "flash_attention_2"),
    "train.scheduler": ("cosine", "linear", "constant", "constant_with_warmup"),
    "wandb.mode": ("offline", "online", "disabled"),
    "sweep.direction": ("minimize", "maximize"),
}

def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


# (key, rule, what the value must be, an example of a good value): checked before anything runs.
_RANGES: list[tuple[str, Any, str, str]] = [
    ("train.lr", lambda v: _finite(v) and v > 0, "a positive number", "2e-4"),
    ("train.warmup_ratio", lambda v: _finite(v) and 0 <= v < 1, "a fraction of the total steps in [0, 1)", "0.03"),
    ("train.epochs", lambda v: _finite(v) and v >= 0, ">= 0 (it counts when train.max_steps <= 0)", "1"),
    ("train.weight_decay", lambda v: _finite(v) and v >= 0, ">= 0", "0.0"),
    ("train.max_grad_norm", lambda v: _finite(v) and v >= 0, ">= 0 (0 turns clipping off)", "1.0"),
    ("train.logging_steps", lambda v: v >= 1, ">= 1 (log every N steps)", "10"),
    ("train.save_steps", lambda v: v >= 1, ">= 1 (a checkpoint every N steps)", "500"),
    ("train.eval_steps", lambda v: v >= 0, ">= 0 (0 evaluates only at the end)", "100"),
    ("train.save_total_limit", lambda v: v >= 1, ">= 1 (train.resume=auto needs a checkpoint)", "2"),
    ("train.seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)", "42"),
    ("model.max_seq_len", lambda v: v >= 16, ">= 16 tokens", "2048"),
    ("hardware.dataloader_workers", lambda v: v >= 0, ">= 0 (0 loads batches in the training process)", "2"),
    ("eval.n_samples", lambda v: v >= 1, ">= 1 (pass@k needs n >= k)", "1"),
    ("eval.limit", lambda v: v is None or v >= 1, ">= 1 or null (all problems)", "null"),
    ("eval.temperature", lambda v: _finite(v) and v >= 0, ">= 0 (0 is greedy)", "0.0"),
    ("eval.top_p", lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]", "0.95"),
    ("eval.max_new_tokens", lambda v: v >= 1, ">= 1", "512"),
    ("eval.batch_size", lambda v: v == "auto" or (isinstance(v, int) and v >= 1), "auto or >= 1 (a cap on rows per batch)", "auto"),
    ("eval.workers", lambda v: v >= 1, ">= 1", "2"),
    ("eval.crate_size", lambda v: v >= 1, ">= 1 (1 compiles each sample alone)", "32"),
    ("eval.timeout_s", lambda v: _finite(v) and v > 0, "a positive number of seconds", "10"),
    ("eval.compile_timeout_s", lambda v: _finite(v) and v > 0, "a positive number of seconds", "60"),
    ("eval.run_mem_mb", lambda v: v >= 64, ">= 64", "4096"),
]


def validate(cfg: DictConfig | RunConfig) -> None:
    """Cross-group rules the schema cannot express. Raises SigilError with one sentence."""
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key) if isinstance(cfg, DictConfig) else _get(cfg, key)
        if value not in allowed:
            hint = " (it comes from $WANDB_MODE)" if key == "wandb.mode" and os.environ.get("WANDB_MODE") == value else ""
            raise SigilError(f"{key}={value!r}{hint} is not one of {', '.join(allowed)}; set {key} to one of them.")
    for key, ok, want, example in _RANGES:
        value = OmegaConf.select(cfg, key) if isinstance(cfg, DictConfig) else _get(cfg, key)
        if not ok(value):
            raise SigilError(f"{key}={value} must be {want}; set it on the command line, e.g. {key}={example}.")
    if cfg.train.resume and cfg.train.overwrite:
        raise SigilError(f"train.resume={cfg.train.resume} and train.overwrite=true contradict each other; "
                         "keep one (resume continues the run, overwrite deletes its checkpoints).")
    q, lora, hw, tr, data = cfg.quant, cfg.lora, cfg.hardware, cfg.train, cfg.data
    if lora.r <= 0:
        raise SigilError(f"lora.r={lora.r} must be a positive integer; try lora.r=16.")
    if lora.alpha <= 0 or not math.isfinite(lora.alpha):
        raise SigilError(f"lora.alpha={lora.alpha} must be positive; try lora.alpha=16 or 'lora.alpha=${{lora.r}}'.")
    if not 0.0 <= lora.dropout < 1.0:
        raise SigilError(f"lora.dropout={lora.dropout} must be in [0, 1); the default is 0.05.")
    if not lora.target_modules:
        raise SigilError("lora.target_modules is empty; pick a preset (lora=all|attn|mlp) or list modules.")
    if q.method != "none" and hw.precision != "fp32" and q.compute_dtype != PRECISION_DTYPE[hw.precision]:
        raise SigilError(
            f"quant.compute_dtype={q.compute_dtype} does not match hardware.precision={hw.precision}; "
            f"set quant.compute_dtype={PRECISION_DTYPE[hw.precision]} (or change hardware.precision)."
        )
    if hw.liger_kernel and hw.device != "cuda":
        raise SigilError("hardware.liger_kernel=true needs hardware.device=cuda (Triton kernels); set hardware.liger_kernel=false.")
    if hw.attn_implementation == "flash_attention_2" and hw.device != "cuda":
        raise SigilError("hardware.attn_implementation=flash_attention_2 needs a CUDA GPU; use hardware.attn_implementation=sdpa.")
    if hw.packing and hw.attn_implementation == "eager":
        raise SigilError(
            "hardware.packing=true with hardware.attn_implementation=eager would let packed documents attend "
            "to each other; use attn_implementation=sdpa or flash_attention_2, or set hardware.packing=false."
        )
    if q.method == "int8" and lora.use_dora and hw.device == "cpu":
        raise SigilError("lora.use_dora=true with quant=int8 is not supported on CPU by bitsandbytes; use quant=nf4.")
    if hw.micro_batch_size < 1 or hw.grad_accum < 1:
        raise SigilError("hardware.micro_batch_size and hardware.grad_accum must be >= 1.")
    if hw.nproc_per_node < 1 or hw.nnodes < 1:
        raise SigilError("hardware.nproc_per_node and hardware.nnodes must be >= 1 (1 = a single process).")
    world = hw.nproc_per_node * hw.nnodes
    if hw.global_batch is not None and (hw.global_batch < 1 or hw.global_batch % world):
        raise SigilError(f"hardware.global_batch={hw.global_batch} must be a positive multiple of the {world} processes "
                         f"(hardware.nproc_per_node x hardware.nnodes); try hardware.global_batch={max(world, 16 // world * world)}.")
    if not 0.1 <= hw.memory_headroom <= 1.0:
        raise SigilError(f"hardware.memory_headroom={hw.memory_headroom} must be in [0.1, 1]; the default is 0.92.")
    if hw.gpu_memory_gb is not None and hw.gpu_memory_gb <= 0:
        raise SigilError(f"hardware.gpu_memory_gb={hw.gpu_memory_gb} must be positive or null (null = ask the GPU).")
    if hw.lora_fused and lora.use_dora:
        raise SigilError("hardware.lora_fused=true has no DoRA path; set hardware.lora_fused=false to train with lora.use_dora=true.")
    if hw.lora_fused and q.method == "int8":
        raise SigilError("hardware.lora_fused=true covers 4-bit and bf16 bases, not quant=int8; "
                         "set hardware.lora_fused=false or use quant=nf4.")
    if hw.optimizer.startswith("paged_") and hw.device != "cuda":
        raise SigilError(f"hardware.optimizer={hw.optimizer} is CUDA-only; use hardware.optimizer=adamw_torch on the CPU.")
    if tr.max_steps <= 0 and tr.epochs <= 0:
        raise SigilError("Set train.max_steps > 0 or train.epochs > 0; both are zero, so nothing would train.")
    if cfg.phase == 2 and not tr.init_adapter:
        raise SigilError(
            "experiment=phase2 refines a phase-1 adapter: set train.init_adapter=<phase-1 run folder>/adapter."
        )
    _validate_in_training_eval(cfg.eval, tr)
    if not 0.0 <= data.val_fraction < 1.0:
        raise SigilError(f"data.val_fraction={data.val_fraction} must be in [0, 1).")
    if not data.sources:
        raise SigilError("data.sources is empty; pick a data option (data=rust_sample) or add a source.")
    for i, src in enumerate(data.sources):  # data.sources.N.*
        if src.kind not in ("jsonl", "parquet", "rust_dir", "hf"):
            raise SigilError(f"data.sources.{i}.kind={src.kind!r} is not one of jsonl, parquet, rust_dir, hf; fix it.")
        if not src.weight > 0 or not math.isfinite(src.weight):
            raise SigilError(f"data.sources.{i}.weight={src.weight} must be > 0 (a multiplier: 2.0 doubles, 0.5 halves); remove the source instead of weighting it 0.")
        if src.max_records is not None and src.max_records < 1:
            raise SigilError(f"data.sources.{i}.max_records={src.max_records} must be >= 1 or null (all records).")
    for task, w in data.task_weights.items():  # data.task_weights
        if not w >= 0 or not math.isfinite(w):
            raise SigilError(f"data.task_weights.{task}={w} must be >= 0 (2.0 doubles, 0.5 halves, 0 removes the task).")
    df = data.filters  # data.filters.*
    if df.min_chars < 0 or df.max_chars <= df.min_chars:
        raise SigilError(f"data.filters.max_chars={df.max_chars} must exceed data.filters.min_chars={df.min_chars} >= 0.")
    if not 0.0 < df.minhash_threshold <= 1.0 or df.minhash_ngram < 1:
        raise SigilError("data.filters.minhash_threshold must be in (0, 1] and data.filters.minhash_ngram >= 1; the defaults are 0.85 and 5.")
    if not 0.0 <= df.max_long_line_share < 1.0:
        raise SigilError(f"data.filters.max_long_line_share={df.max_long_line_share} must be in [0, 1); the default is 0.1.")
    if df.min_idiomatic_ratio < 0 or df.max_line_chars < 0:
        raise SigilError("data.filters.min_idiomatic_ratio and data.filters.max_line_chars must be >= 0 (max_line_chars 0 = no limit).")
    if data.num_proc < 1 or (data.max_examples is not None and data.max_examples < 1):
        raise SigilError("data.num_proc must be >= 1 and data.max_examples null or >= 1.")


KEEP_BEST = ("eval/pass@1", "eval/compile_rate")  # train.keep_best choices (higher is better)


def _validate_in_training_eval(ev: Any, tr: Any) -> None:
    if ev.every_steps < 0:
        raise SigilError(f"eval.every_steps={ev.every_steps} must be >= 0 (0 = no evaluation during training).")
    sub = ev.subset
    ok = sub is None or (isinstance(sub, int) and not isinstance(sub, bool) and sub >= 1) or (
        isinstance(sub, list | tuple | ListConfig) and len(sub) > 0 and all(isinstance(t, str) for t in sub))
    if not ok:
        raise SigilError(f"eval.subset={sub!r} must be null, a number of problems >= 1, or a list of task ids "
                         "such as [SigilRust/0,SigilRust/3].")
    if tr.keep_best is not None and tr.keep_best not in KEEP_BEST:
        raise SigilError(f"train.keep_best={tr.keep_best} is not one of {', '.join(KEEP_BEST)}; "
                         "set train.keep_best=eval/pass@1 or null.")
    if tr.keep_best is not None and ev.every_steps <= 0:
        raise SigilError(f"train.keep_best={tr.keep_best} needs evaluations during training to pick from; "
                         "set eval.every_steps=N (e.g. train.save_steps) or train.keep_best=null.")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


