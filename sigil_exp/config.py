"""Typed schemas for every config group, registered in Hydra's ConfigStore.

The root schema (`RunConfig`) types each group, so a typo such as `lora.rr=4` fails at compose
time with Hydra's "Key 'rr' not in 'LoraConfig'" message, and `quant=nf5` fails with the list
of available options. The rules that span groups are `sigil_exp.validation.validate()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


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
    # What generation multiplies by. trained: the model as trained (4-bit base + LoRA; least memory). dense: a copy
    # of the dequantised base in the compute dtype (bf16 on GPUs) with the adapter beside it: the same weights, faster.
    # merged: the adapter merged into that copy (export's weights: one more rounding). auto: dense on CUDA if it fits.
    weights: str = "auto"  # auto | trained | dense | merged
    compile: bool = False  # static KV cache + torch.compile (transformers generate) instead of the own decode loop
    # true: write eval/completions.jsonl and stop (a GPU box without Rust); execute them where rustc is with
    # `python -m sigil_exp.evaluate --completions <run>/eval/completions.jsonl`
    generate_only: bool = False
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


PRECISION_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # hardware.precision -> torch dtype name


def _dtype_of(precision: str) -> str:
    return PRECISION_DTYPE.get(str(precision), "bfloat16")


def register_resolvers() -> None:
    # `lora.alpha: ${mul:2,${lora.r}}` ties alpha to rank (alpha = 2r).
    # `precision: ${cpu_precision:}` (hardware=cpu) and `compute_dtype: ${dtype_of:${hardware.precision}}` (quant).
    for name, fn in (("mul", _mul), ("cpu_precision", cpu_precision), ("dtype_of", _dtype_of)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
register_configs()


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
