"""Memory preflight: estimate a run's peak GPU memory from its composed config before anything is
loaded, print it, and stop with one sentence naming the knob to change when it cannot fit.

    estimate_memory(shape, quant, lora, hardware, seq_len, micro_batch) -> MemoryEstimate
    preflight(cfg, model_path)   # what train() calls: logs the estimate, resolves auto micro-batch, may raise

The estimate is of PyTorch's peak *allocated* memory (what `torch.cuda.max_memory_allocated`
reports), built from the tensors a training step keeps alive:

    weights      quantised linears at their storage size (nf4 + double quant: 0.516 byte/param),
                 embeddings / lm_head / norms in bf16, or fp32 when `upcast_non_lora` upcasts them
    lora         adapter weights + grads (bf16, as trl casts them) + optimizer state (8-bit Adam: 2
                 bytes/param; paged state lives in managed memory, outside PyTorch's count)
    activations  per token and layer: the tensors autograd saves (norm inputs, LoRA inputs, q/k/v and
                 the attention output, the MLP intermediates), which depend on Liger kernels, fused
                 LoRA, LoRA dropout and the fp32 upcast; all layers without checkpointing, or each
                 layer's input plus one recomputed layer with it
    logits / CE  Liger's fused linear cross-entropy keeps chunks only; otherwise bf16 logits, their
                 fp32 copy, log-probabilities and their gradient: ~14 bytes x vocab per token
    transient    one dequantised weight in forward and backward; the mask sdpa builds for packed batches

The per-token coefficients were checked against measured peaks on an H200 (docs/gpu-notes.md;
the bench prints estimate vs measured for every row).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sigil_exp.config import HardwareConfig, LoraConfig, QuantConfig, RunConfig, SigilError
from sigil_exp.distributed import world_size

log = logging.getLogger(__name__)

GB = 1e9
CUDA_CONTEXT_GB = 0.6  # CUDA context + cuBLAS/cuDNN handles: on the card, outside PyTorch's allocator


# ------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one decoder layer."""
        d, m, q = self.hidden, self.intermediate, self.heads * self.hd
        return {"q_proj": (d, q), "k_proj": (d, self.kv_dim), "v_proj": (d, self.kv_dim), "o_proj": (q, d),
                "gate_proj": (d, m), "up_proj": (d, m), "down_proj": (m, d)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linears().values())

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: every projection plus the lm_head."""
        return self.linear_params + self.vocab * self.hidden

    def lora_params(self, lora: LoraConfig) -> int:
        return self.layers * sum(lora.r * (i + o) for n, (i, o) in self.linears().items() if n in lora.target_modules)

    @classmethod
    def from_hf_config(cls, c: Any) -> ModelShape:
        get = c.get if isinstance(c, dict) else (lambda k, default=None: getattr(c, k, default))
        return cls(hidden=get("hidden_size"), intermediate=get("intermediate_size"), layers=get("num_hidden_layers"),
                   heads=get("num_attention_heads"), kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
                   vocab=get("vocab_size"), tied=bool(get("tie_word_embeddings", False)), head_dim=get("head_dim"))

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelShape:
        f = Path(path) / "config.json"
        if not f.is_file():
            raise SigilError(f"{f} does not exist; point model.name_or_path at a folder holding a transformers checkpoint.")
        c = json.loads(f.read_text())
        return cls.from_hf_config(c.get("text_config", c))


LLAMA_3_8B = ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)


# ------------------------------------------------------------------------------------- estimate
@dataclass
class MemoryEstimate:
    weights: float  # bytes
    lora: float
    activations: float  # kept from forward to backward (all layers, or each layer's input with checkpointing)
    logits: float  # the loss head at the end of forward
    layer_backward: float  # one layer's backward (plus its recomputed forward with checkpointing)
    transient: float
    tokens: int
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> float:
        # the loss head is freed before the first layer's backward starts: the two peaks do not add up
        return self.weights + self.lora + self.activations + max(self.logits, self.layer_backward) + self.transient

    @property
    def total_gb(self) -> float:
        return self.total / GB

    def describe(self) -> str:
        return (f"{self.total_gb:.1f} GB (weights {self.weights / GB:.1f}, LoRA+optimizer {self.lora / GB:.2f}, "
                f"activations {self.activations / GB:.1f}, then the larger of logits/CE {self.logits / GB:.1f} "
                f"and a layer's backward {self.layer_backward / GB:.1f}, transient {self.transient / GB:.1f})")

    def as_dict(self) -> dict[str, Any]:
        return {"total_gb": round(self.total_gb, 3), "weights_gb": round(self.weights / GB, 3),
                "lora_gb": round(self.lora / GB, 3), "activations_gb": round(self.activations / GB, 3),
                "logits_gb": round(self.logits / GB, 3), "layer_backward_gb": round(self.layer_backward / GB, 3),
                "transient_gb": round(self.transient / GB, 3),
                "tokens": self.tokens, **self.detail}


_QUANT_BYTES = {"nf4": (0.5 + 1 / 64 + 4 / (64 * 256)), "fp4": (0.5 + 1 / 64 + 4 / (64 * 256)), "int8": 1.0}


def _weight_bytes_per_param(q: QuantConfig) -> float:
    if q.method == "none":
        return 2.0 if q.compute_dtype != "float32" else 4.0
    if q.method in ("nf4", "fp4") and not q.double_quant:
        return 0.5 + 4 / 64
    return _QUANT_BYTES[q.method]


def _optimizer_state_bytes(opt: str) -> float:
    """Bytes per trainable parameter that PyTorch's allocator holds for the optimizer state."""
    if opt.startswith("paged_"):
        return 0.0  # bitsandbytes allocates paged state in CUDA managed memory, outside PyTorch's count
    if "8bit" in opt:
        return 2.0
    if "adafactor" in opt:
        return 0.1
    if "sgd" in opt:
        return 0.0
    return 8.0


def layer_activation_bytes(shape: ModelShape, q: QuantConfig, lora: LoraConfig, hw: HardwareConfig) -> float:
    """Bytes that autograd keeps per token for one decoder layer in a training step."""
    d, kv, m = shape.hidden, shape.kv_dim, shape.intermediate
    qd = shape.heads * shape.hd
    upcast = hw.upcast_non_lora and q.method != "none"
    sb = 4 if upcast else 2  # dtype of the residual stream, norm outputs and MLP (fp32 after the kbit upcast)
    liger = hw.liger_kernel
    fused = hw.lora_fused
    p = lora.dropout
    targets = set(lora.target_modules)
    total = 0.0
    # the two RMSNorms: Liger saves its bf16 input and rstd; transformers' keeps an fp32 copy
    total += 2 * ((sb * d + 4) if liger else (4 * d + 4))
    # attention: q/k/v after RoPE, output and logsumexp as SDPA/flash saves them (bf16 under autocast)
    total += 2 * qd + 4 * kv + 2 * qd + 4 * shape.heads
    if not liger and upcast:
        total += 4 * (qd + 2 * kv)  # fp32 q/k/v from the upcast path, kept by RoPE's products
    # MLP intermediates (fp32 after the upcast): Liger SwiGLU keeps gate and up; transformers' also silu(gate)
    total += (2 * sb * m) if liger else (3 * sb * m)
    # inputs of the LoRA'd projections, grouped by the tensor they read
    groups = [(("q_proj", "k_proj", "v_proj"), d, sb), (("o_proj",), qd, 2), (("gate_proj", "up_proj"), d, sb),
              (("down_proj",), m, sb)]
    for names, width, in_bytes in groups:
        users = [n for n in names if n in targets]
        if not users:
            continue
        if fused:
            total += in_bytes * width  # one saved input, shared; dropout mask regenerated in backward
        elif p > 0:
            per = in_bytes * width + 1 * width + (2 * width if in_bytes == 4 else 0)  # dropout out + mask (+bf16 cast)
            total += len(users) * per
        else:
            total += in_bytes * width + (len(users) * 2 * width if in_bytes == 4 else 0)
    # the attention output reshaped for o_proj is a copy (kept when o_proj has LoRA: counted above)
    return total


def estimate_memory(shape: ModelShape, q: QuantConfig, lora: LoraConfig, hw: HardwareConfig, seq_len: int,
                    micro_batch: int) -> MemoryEstimate:
    """Peak PyTorch-allocated bytes of one training step at `micro_batch` x `seq_len` tokens."""
    d, V, L = shape.hidden, shape.vocab, shape.layers
    tokens = micro_batch * seq_len
    upcast = hw.upcast_non_lora and q.method != "none"
    other_bytes = 4 if upcast else (2 if q.compute_dtype != "float32" else 4)
    n_other = V * d * (1 if shape.tied else 2) + (2 * L + 1) * d
    weights = shape.linear_params * _weight_bytes_per_param(q) + n_other * other_bytes
    n_lora = shape.lora_params(lora)
    lora_bytes = n_lora * (2 + 2 + _optimizer_state_bytes(hw.optimizer))

    per_layer = layer_activation_bytes(shape, q, lora, hw)
    sb = 4 if upcast else 2
    if hw.gradient_checkpointing:
        kept = L * sb * d * tokens  # each layer's input
        layer_peak = 1.5 * per_layer * tokens  # one layer recomputed + its gradients in flight
    else:
        kept = L * per_layer * tokens
        layer_peak = 0.5 * per_layer * tokens
    if hw.liger_kernel:
        chunks = math.ceil(V / d)
        ce = tokens * (2 * d + 2 * 4 * V / chunks)  # hidden-state grad + one chunk of fp32 logits and grads
    else:
        ce = tokens * 14 * V  # bf16 logits, fp32 copy, log-probs, their grad
    activations = kept
    logits = ce
    # transients: one dequantised weight (forward) + one (backward); the bf16 cast of an fp32 lm_head
    big = max(i * o for i, o in shape.linears().values())
    transient = 2 * 2 * big + (2 * V * d if upcast else 0)
    mask = 0.0
    if hw.attn_implementation == "sdpa" and hw.packing and micro_batch > 1:
        mask = float(tokens) ** 2  # padding-free packing: one bool mask over the flattened batch
    elif hw.attn_implementation == "eager":
        mask = micro_batch * shape.heads * seq_len ** 2 * 6
    transient += mask
    detail = {"per_token_layer_kb": round(per_layer / 1e3, 1), "lora_params": n_lora, "micro_batch": micro_batch,
              "seq_len": seq_len, "checkpointing": hw.gradient_checkpointing}
    return MemoryEstimate(weights=weights, lora=lora_bytes, activations=activations, logits=logits,
                          layer_backward=layer_peak, transient=transient, tokens=tokens, detail=detail)


# ------------------------------------------------------------------------------------ the check
@dataclass
class Budget:
    gb: float | None  # bytes PyTorch may allocate for this run, in GB; None = no GPU to check against
    source: str


def memory_budget(hw: HardwareConfig) -> Budget:
    """What the run may allocate: the card (hardware.gpu_memory_gb, else what CUDA reports) times
    memory_headroom, and never more than is free now minus the CUDA context."""
    import torch

    cap, free, source = None, None, ""
    if hw.device == "cuda" and torch.cuda.is_available():
        free_b, total_b = torch.cuda.mem_get_info()
        free, cap, source = free_b / GB, total_b / GB, f"{total_b / GB:.0f} GB GPU ({free_b / GB:.0f} GB free)"
    if hw.gpu_memory_gb is not None:
        cap = float(hw.gpu_memory_gb) if cap is None else min(cap, float(hw.gpu_memory_gb))
        source = f"hardware.gpu_memory_gb={hw.gpu_memory_gb:g}" + (f", {source}" if source else "")
    if cap is None:
        return Budget(None, "no GPU")
    budget = cap * hw.memory_headroom - CUDA_CONTEXT_GB
    if free is not None:
        budget = min(budget, free - CUDA_CONTEXT_GB)
    return Budget(budget, source)


def allocation_cap_gb(hw: HardwareConfig) -> float | None:
    """The most PyTorch may hold on the GPU at once when the card is `hardware.gpu_memory_gb` (times
    memory_headroom, less the CUDA context); None when no card size is set (then: what is free). Generation
    sizes its batch and the merged copy under it, so a consumer_24gb run stays inside 24 GB on any card."""
    if hw.device != "cuda" or hw.gpu_memory_gb is None:
        return None
    return float(hw.gpu_memory_gb) * hw.memory_headroom - CUDA_CONTEXT_GB


def _divisors_desc(n: int) -> list[int]:
    return [k for k in range(n, 0, -1) if n % k == 0]


def choose_micro_batch(shape: ModelShape, q: QuantConfig, lora: LoraConfig, hw: HardwareConfig, seq_len: int,
                       budget_gb: float) -> int | None:
    """The largest divisor of micro_batch_size x grad_accum whose estimate fits; None if even 1 does not."""
    for mb in _divisors_desc(hw.micro_batch_size * hw.grad_accum):
        if estimate_memory(shape, q, lora, hw, seq_len, mb).total_gb <= budget_gb:
            return mb
    return None


def _fix_hint(shape: ModelShape, cfg_q: QuantConfig, lora: LoraConfig, hw: HardwareConfig, seq_len: int,
              mb: int, budget_gb: float) -> str:
    """The first single knob change that makes the run fit, with its estimate."""
    from dataclasses import replace

    tries: list[tuple[str, HardwareConfig, int, int]] = []
    if not hw.gradient_checkpointing:
        tries.append(("hardware.gradient_checkpointing=true", replace(hw, gradient_checkpointing=True), mb, seq_len))
    if not hw.liger_kernel and hw.device == "cuda":
        tries.append(("hardware.liger_kernel=true", replace(hw, liger_kernel=True), mb, seq_len))
    if hw.upcast_non_lora and cfg_q.method != "none":
        tries.append(("hardware.upcast_non_lora=false", replace(hw, upcast_non_lora=False), mb, seq_len))
    if not hw.lora_fused and cfg_q.method != "int8" and not lora.use_dora:
        tries.append(("hardware.lora_fused=true", replace(hw, lora_fused=True), mb, seq_len))
    for smaller in _divisors_desc(mb)[1:]:
        tries.append((f"hardware.micro_batch_size={smaller} (and grad_accum x{mb // smaller})", hw, smaller, seq_len))
    s = seq_len // 2
    while s >= 256:
        tries.append((f"model.max_seq_len={s}", hw, mb, s))
        s //= 2
    for text, h, b, sl in tries:
        est = estimate_memory(shape, cfg_q, lora, h, sl, b)
        if est.total_gb <= budget_gb:
            return f"set {text} (estimated {est.total_gb:.1f} GB)"
    return "use a larger GPU or a smaller model (no single knob makes it fit)"


def check_fits(shape: ModelShape, q: QuantConfig, lora: LoraConfig, hw: HardwareConfig, seq_len: int,
               budget: Budget) -> tuple[int, MemoryEstimate]:
    """(micro_batch, estimate); resolves auto_micro_batch; raises SigilError when it cannot fit."""
    mb = hw.micro_batch_size
    if budget.gb is not None and hw.auto_micro_batch:
        chosen = choose_micro_batch(shape, q, lora, hw, seq_len, budget.gb)
        mb = chosen if chosen is not None else 1
    est = estimate_memory(shape, q, lora, hw, seq_len, mb)
    if budget.gb is not None and est.total_gb > budget.gb:
        hint = _fix_hint(shape, q, lora, hw, seq_len, mb, budget.gb)
        raise SigilError(
            f"Preflight: this run needs an estimated {est.describe()} at micro-batch {mb} x {seq_len} tokens, "
            f"more than the {budget.gb:.1f} GB it may use ({budget.source}, hardware.memory_headroom="
            f"{hw.memory_headroom:g}); {hint}.")
    return mb, est


def apply_global_batch(hw: HardwareConfig, world: int) -> None:
    """hardware.global_batch -> this process's micro_batch x grad_accum = global_batch / world, the
    micro-batch the largest divisor not above the configured one (auto micro-batch may raise it), so a
    1-GPU and an N-GPU run step on the same number of sequences."""
    if hw.global_batch is None:
        return
    per = hw.global_batch // world
    mb = max(d for d in range(1, min(hw.micro_batch_size, per) + 1) if per % d == 0)
    hw.micro_batch_size, hw.grad_accum = mb, per // mb


def preflight(cfg: RunConfig, model_path: str | Path) -> MemoryEstimate:
    """train()'s memory check, before the model is loaded: log the estimate; with
    hardware.auto_micro_batch pick the micro-batch (keeping micro_batch_size x grad_accum); raise
    SigilError naming the knob to change when the run cannot fit."""
    hw = cfg.hardware
    apply_global_batch(hw, world_size())
    shape = ModelShape.from_model_dir(model_path)
    budget = memory_budget(hw) if hw.preflight else Budget(None, "hardware.preflight=false")
    mb, est = check_fits(shape, cfg.quant, cfg.lora, hw, cfg.model.max_seq_len, budget)
    if mb != hw.micro_batch_size:
        effective = hw.micro_batch_size * hw.grad_accum
        log.info("Preflight: hardware.auto_micro_batch chose micro-batch %d x grad_accum %d (effective batch %d kept)",
                 mb, effective // mb, effective)
        hw.micro_batch_size, hw.grad_accum = mb, effective // mb
    where = f"; budget {budget.gb:.1f} GB ({budget.source})" if budget.gb is not None else f" ({budget.source})"
    log.info("Preflight: estimated peak GPU memory %s at micro-batch %d x %d tokens%s", est.describe(), mb,
             cfg.model.max_seq_len, where)
    return est
