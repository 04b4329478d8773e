"""Typed schemas for every config group, registered in Hydra's ConfigStore.

The root schema (`RunConfig`) types each group, so a typo such as `lora.rr=4` fails at compose
time with Hydra's "Key 'rr' not in 'LoraConfig'" message, and `quant=nf5` fails with the list
of available options. `validate()` holds the rules that span groups; each failure is one
sentence naming the key and the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf


class SigilError(Exception):
    """A user-facing failure: the message is one sentence naming the key or file and the fix."""


# --------------------------------------------------------------------------------------- model
@dataclass
class TinyModelConfig:
    """Shape of the Llama built locally (random weights) when `model.build_tiny` is set."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 1024  # BPE trained offline on the bundled Rust corpus
    initializer_range: float = 0.02  # std of the random weights
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in run names, e.g. llama3.1-8b-instruct
    name_or_path: str = MISSING  # hub id or local directory
    revision: str | None = None  # hub revision (branch, tag or commit); None = default branch
    max_seq_len: int = 2048
    use_chat_template: bool = False  # format examples with the tokenizer's chat template
    trust_remote_code: bool = False
    # When set, the model is built locally (random weights + offline tokenizer) into
    # name_or_path if that directory does not exist yet. Used by `model=tiny`.
    build_tiny: TinyModelConfig | None = None


# --------------------------------------------------------------------------------------- quant
@dataclass
class QuantConfig:
    method: str = "nf4"  # nf4 | fp4 | int8 | none
    double_quant: bool = True  # quantise the quantisation constants too (~0.4 bit/param saved)
    compute_dtype: str = "bfloat16"  # bfloat16 | float16 | float32
    quant_storage: str = "uint8"  # uint8 | bfloat16 (bfloat16 needed for FSDP-sharded QLoRA)


# ---------------------------------------------------------------------------------------- lora
@dataclass
class LoraConfig:
    name: str = "all"  # preset label used in run names: all | attn | mlp | custom
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    bias: str = "none"  # none | all | lora_only
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # weight-decomposed LoRA; slower per step
    init_weights: str = "default"  # default | gaussian | pissa | olora


# ---------------------------------------------------------------------------------------- data
@dataclass
class SourceConfig:
    """One data source. `kind` picks the loader; unused fields are ignored by other kinds."""

    kind: str = "jsonl"  # jsonl | parquet | rust_dir (a tree of .rs files) | hf (hub id or local dataset)
    path: str = MISSING  # file, directory, glob, or hub id (kind=hf); pkg:// = bundled asset
    weight: float = 1.0  # multiplier on this source's records: 2.0 = each twice, 0.5 = a seeded half
    name: str | None = None  # label in stats; default derived from path
    split: str = "train"  # kind=hf: the split to read
    subset: str | None = None  # kind=hf: the dataset's config name, if it has several
    data_dir: str | None = None  # kind=hf: a folder inside the dataset repo (the-stack: data/rust)
    streaming: bool = False  # kind=hf: stream instead of downloading the whole split (pair with max_records)
    text_field: str | None = None  # jsonl/parquet/hf: column holding raw text (default: text, content, code)
    max_records: int | None = None  # cap per source: the first N records kept by the filters; None = all


@dataclass
class FilterConfig:
    # Matched against path components of the crate/repo-relative path (sigil_exp/data/walk.py):
    # `name/` = a folder outside the crate's src/ (so src/target/ is a module, kept); `name` = a
    # file/folder name that fnmatches it or holds it as a whole word (`generated`, not `degenerated`).
    skip_paths: list[str] = field(
        default_factory=lambda: ["vendor/", "target/", "node_modules/", "third_party/", ".git/", "generated"]
    )
    # keep | strip (remove #[cfg(test)] items and #[test]-style fns; drop test files: #![cfg(test)],
    # or tests/ and *_test.rs files with #[test] fns) | drop (any record with test code). Same for
    # source files, the gen of {prompt, gen} pairs and the assistant turns of {messages}.
    tests: str = "keep"
    drop_benches: bool = False  # benches/ paths
    drop_examples: bool = False  # examples/ paths
    min_chars: int = 20  # shorter code is dropped (after stripping tests)
    max_chars: int = 200_000  # longer files are dropped (overlong token sequences are split, see data.overlong)
    max_line_chars: int = 1000  # a longer line of code (comments not counted) is a "long line"; 0 = no limit
    max_long_line_share: float = 0.1  # drop a file when more than this share of its lines are long (minified
    #                                   code, data tables); 0 = drop on one long line
    prefer_documented: bool = False  # keep only files with doc comments (///, //!, /** */)
    prefer_idiomatic: bool = False  # keep only files whose idiomatic/low-quality marker ratio passes
    min_idiomatic_ratio: float = 1.0  # idiomatic markers (?, iterator adapters, impl, match, Result<, derive)
    #                                   per low-quality one (TODO, .unwrap(), unsafe, #[allow], println!/dbg!)
    quality_on_pairs: bool = False  # also apply prefer_* to the code of {prompt, gen}/chat records
    dedup: str = "exact"  # none | exact (normalised content hash) | minhash (near-duplicates too, slower)
    minhash_threshold: float = 0.85  # estimated Jaccard similarity above which two files are duplicates
    minhash_ngram: int = 5  # tokens per shingle: smaller = more files look alike


@dataclass
class DataConfig:
    name: str = MISSING
    sources: list[SourceConfig] = field(default_factory=list)
    format: str = "completion"  # completion (loss on gen) | text (loss on all) | chat (assistant turns)
    mix: str = "weighted"  # weighted (shuffled) | sequential (source blocks) | round_robin; the trainer still samples at random
    task_weights: dict[str, float] = field(default_factory=dict)  # by _task_type, e.g. {error_fixing: 2.0}
    filters: FilterConfig = field(default_factory=FilterConfig)
    val_fraction: float = 0.1  # by content hash: stable when sources are added
    overlong: str = "split"  # split (into max_seq_len chunks, prompt kept whole) | truncate | drop; all counted
    on_error: str = "raise"  # raise | skip (count malformed records instead of failing)
    num_proc: int = 2  # preprocessing workers (capped at the CPU count)
    cache: bool = True  # cache the processed dataset keyed by data config + tokenizer + sources
    max_examples: int | None = None  # cap after mixing (smoke runs)


# ------------------------------------------------------------------------------------ hardware
@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = "cuda"  # cuda | cpu
    precision: str = "bf16"  # bf16 | fp16 | fp32 (autocast for the trainable path)
    micro_batch_size: int = 4
    grad_accum: int = 4
    gradient_checkpointing: bool = True
    checkpointing_reentrant: bool = False  # non-reentrant is faster and works with frozen inputs
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    optimizer: str = "paged_adamw_8bit"  # any transformers optim name
    dataloader_workers: int = 2
    packing: bool = True  # padding-free packing with per-document position ids
    liger_kernel: bool = False  # fused RMSNorm/SwiGLU/RoPE/linear-cross-entropy (needs [fast] extra)
    upcast_non_lora: bool = True  # prepare_model_for_kbit_training: fp32 norms/embeddings/lm_head
    torch_compile: bool = False
    gpu_memory_gb: float | None = None  # card size the preset is tuned for (preflight)
    # LoRA weights' storage dtype. float32 = fp32 master weights (bf16 compute under autocast): small
    # Adam updates are not rounded away, so the loss tracks an fp32 run. bfloat16 = trl's QLoRA default.
    adapter_dtype: str = "float32"
    lora_fused: bool = False  # one autograd op per LoRA linear (dequant+matmul+LoRA); same math, less memory traffic
    auto_micro_batch: bool = False  # largest micro_batch dividing micro_batch*grad_accum that preflight says fits
    preflight: bool = True  # estimate peak GPU memory before loading; stop with the knob to change if it cannot fit
    memory_headroom: float = 0.92  # share of the card's memory the estimate may fill (allocator slack, CUDA context)
    # Data parallel (DDP): one process per GPU, each with its own 4-bit base + LoRA; LoRA gradients all-reduced.
    nproc_per_node: int = 1  # processes (GPUs) per node; > 1 starts them through torch's elastic launcher
    nnodes: int = 1  # nodes; > 1 needs hardware.rdzv_endpoint (found by itself in a SLURM job)
    node_rank: int = 0  # this node's index (informational; the rendezvous assigns ranks; SLURM_NODEID wins)
    rdzv_endpoint: str | None = None  # host:port where the nodes meet; null = the SLURM job's first node:29500
    global_batch: int | None = None  # sequences per optimizer step over all GPUs: grad_accum = global_batch / (micro_batch x GPUs)


# --------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    seed: int = 42
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    lr: float = 2e-4
    scheduler: str = "cosine"  # cosine | linear | constant | constant_with_warmup
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: int = 100  # 0 = only at the end
    save_steps: int = 500
    save_total_limit: int = 2
    init_adapter: str | None = None  # start from this adapter (phase 2)
    resume: str | None = None  # null | auto (newest complete checkpoint in the run folder) | <checkpoint path>
    overwrite: bool = False  # start over in a run folder that holds checkpoints (deletes them)
    # null | eval/pass@1 | eval/compile_rate: <run>/adapter = the adapter of the step where the in-training
    # evaluation (eval.every_steps) scored best (first to reach it); the last step's stays in checkpoints/
    keep_best: str | None = None


# ---------------------------------------------------------------------------------------- eval
@dataclass
class EvalConfig:
    enabled: bool = False  # run the Rust compile/test evaluation after training
    problems: str = "pkg://assets/rust_problems.jsonl"  # HumanEval-Rust JSONL; pkg:// = bundled
    limit: int | None = None  # evaluate only the first N problems
    n_samples: int = 1  # completions per problem (pass@k needs n >= k)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.95
    max_new_tokens: int = 512
    # Generation speed (same outputs): rows per batch at most, or auto (every sample of every problem at once
    # when memory allows; CPU: up to 256). Rows are sorted by prompt length; finished rows leave the batch.
    batch_size: Any = "auto"  # auto | a positive integer cap
    merge: Any = "auto"  # auto (CUDA, if a bf16 copy fits: ~2x faster) | true | false (4-bit base + LoRA, least memory)
    compile: bool = False  # static KV cache + torch.compile (transformers generate) instead of the own decode loop
    edition: str = "2021"
    timeout_s: float = 10.0  # per test run (wall clock)
    workers: int = 2
    clippy: bool = False  # also count clippy warnings (clippy-driver instead of rustc)
    seed: int = 0  # sampling seed (temperature > 0)
    compile_timeout_s: float = 60.0  # per rustc invocation (wall clock)
    crate_size: int = 32  # samples compiled together as one crate; 1 = one rustc per sample (slower)
    sandbox: str = "auto"  # auto (strongest available) | namespaces | rlimits
    sandbox_allow_root: bool = False  # rlimits level as root where rustc cannot drop root: run it as root anyway
    run_mem_mb: int = 4096  # memory of a test run: heap + private mappings + thread stacks (RLIMIT_DATA)
    run_threads: int = 256  # processes + threads of a test run (RLIMIT_NPROC, per sandbox uid)
    run_output_mb: int = 64  # largest file a test run writes, its stdout/stderr included (RLIMIT_FSIZE)
    run_disk_mb: int = 256  # private writable dir of a test run, also its /tmp (a tmpfs; namespaces level)
    run_cpu_s: float = 60.0  # CPU seconds of a test run, all threads together (keep it >= timeout_s)
    every_steps: int = 0  # > 0: also evaluate eval.subset every N optimizer steps and at the last (eval/pass@1 over steps)
    subset: Any = None  # problems evaluated during training: null = the final ones (eval.limit), N = the first N, [task ids]


# --------------------------------------------------------------------------------------- wandb
@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (sync later) | online | disabled
    project: str = "sigil_exp"
    entity: str | None = None
    group: str | None = None  # default: the sweep folder's name in a multirun, else none
    name: str | None = None  # default: derived from the config, e.g. r32-a16-all
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"


# --------------------------------------------------------------------------------------- sweep
@dataclass
class SweepConfig:
    """What a sweep (`-m`) optimises and reports; a single run ignores it."""

    objective: str = "eval/loss"  # metrics.json key returned to the sweeper (optuna) and sorted on in the report
    direction: str = "minimize"  # minimize | maximize (eval/pass@1 and eval/compile_rate: maximize)
    report: bool = True  # write <sweep dir>/report.md, report.csv and plots when the sweep ends
    one_gpu_per_job: bool = False  # parallel jobs on one multi-GPU machine: job k sees GPU (k mod visible GPUs)


# ---------------------------------------------------------------------------------------- root
@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    lora: LoraConfig = MISSING
    data: DataConfig = MISSING
    hardware: HardwareConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    experiment: str = "default"  # set by experiment/*.yaml; used in tags and run names
    phase: int = 1  # 1 = broad corpus; 2 = refinement from a phase-1 adapter
    cache_dir: str = "~/.cache/sigil_exp"  # tiny models and processed datasets
    dry_run: bool = False  # compose, validate and print the launch plan; train nothing


def register_configs() -> None:
    cs = ConfigStore.instance()
    # The root schema types every group (model: ModelConfig, ...), so each group's yaml files are
    # checked against their dataclass without a per-group schema entry in the defaults lists.
    cs.store(name="run_schema", node=RunConfig)


def _mul(a: Any, b: Any) -> float:
    return float(a) * float(b)


def cpu_precision() -> str:
    """bf16 where this CPU multiplies bf16 natively (AVX-512 and up), else fp32: on AVX2-only CPUs
    bf16 matmuls are emulated and run 10-20x slower than fp32 (measured: a smoke step 40 s vs 3 s)."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    return "bf16" if cap.startswith("AVX512") or "AMX" in cap else "fp32"


def _dtype_of(precision: str) -> str:
    return _PRECISION_DTYPE.get(str(precision), "bfloat16")


def register_resolvers() -> None:
    # `lora.alpha: ${mul:2,${lora.r}}` ties alpha to rank (alpha = 2r).
    # `precision: ${cpu_precision:}` (hardware=cpu) and `compute_dtype: ${dtype_of:${hardware.precision}}` (quant).
    for name, fn in (("mul", _mul), ("cpu_precision", cpu_precision), ("dtype_of", _dtype_of)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
register_configs()


# ---------------------------------------------------------------------------------- validation
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

_PRECISION_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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
    if q.method != "none" and hw.precision != "fp32" and q.compute_dtype != _PRECISION_DTYPE[hw.precision]:
        raise SigilError(
            f"quant.compute_dtype={q.compute_dtype} does not match hardware.precision={hw.precision}; "
            f"set quant.compute_dtype={_PRECISION_DTYPE[hw.precision]} (or change hardware.precision)."
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


def to_object(cfg: DictConfig) -> RunConfig:
    """Resolve interpolations and turn the composed DictConfig into the typed RunConfig. A value left
    `???` or an interpolation that does not resolve fails in one sentence naming the key."""
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, ValidationError

    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise SigilError(f"{e.full_key} is required but not set (???); add `{e.full_key}=<value>` to the command.") from None
    except (InterpolationResolutionError, ValidationError) as e:
        raw = OmegaConf.to_container(cfg, resolve=False)
        for part in str(e.full_key).split("."):
            raw = raw.get(part) if isinstance(raw, dict) else None
        reason = str(e).splitlines()[0].rstrip(".")
        raise SigilError(f"{e.full_key}={raw} cannot be resolved ({reason}); fix the value, e.g. "
                         "'lora.alpha=${lora.r}' refers to another key by its full name.") from None
    assert isinstance(obj, RunConfig)
    return obj
