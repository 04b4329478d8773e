"""Tokenizer, quantised base model and LoRA adapter: the three things a run trains with."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from sigil_exp.config import HardwareConfig, LoraConfig, ModelConfig, QuantConfig, SigilError
from sigil_exp.distributed import device_map

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local directory to load from: the tiny model is built on first use; a hub id is looked
    up in the local Hugging Face cache, then downloaded if the machine is online."""
    if cfg.build_tiny is not None:
        from sigil_exp.tiny import build_tiny

        return str(build_tiny(cfg.name_or_path, cfg.build_tiny))
    local = Path(cfg.name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise SigilError(f"model.name_or_path={cfg.name_or_path} is a directory without config.json; "
                             "point it at a folder that holds a transformers checkpoint.")
        return str(local)
    looks_like_path = cfg.name_or_path.startswith(("/", ".", "~")) or cfg.name_or_path.count("/") > 1
    hint = ("set model.name_or_path=/path/to/a/local/copy (config.json + *.safetensors + tokenizer), "
            "or run `make demo` for the tiny local model")
    if looks_like_path:
        raise SigilError(f"Model directory {local} does not exist; {hint}.")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return snapshot_download(cfg.name_or_path, revision=cfg.revision, local_files_only=True, allow_patterns=patterns)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise SigilError(f"Model {cfg.name_or_path!r} is not a local directory and not in the Hugging Face cache "
                         f"(HF_HUB_OFFLINE is set, so nothing was downloaded); {hint}.")
    try:
        log.info("Downloading %s from the Hugging Face hub", cfg.name_or_path)
        return snapshot_download(cfg.name_or_path, revision=cfg.revision, allow_patterns=patterns)
    except Exception as e:
        raise SigilError(f"Model {cfg.name_or_path!r} is not a local directory, not in the Hugging Face cache, and "
                         f"could not be downloaded ({type(e).__name__}); {hint}.") from None


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path or resolve_model_path(cfg), revision=cfg.revision if path is None else None,
                                        trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:  # Llama 3 ships no pad token; its reserved fine-tune pad id is the usual choice
        pad = "<|finetune_right_pad_id|>"
        tok.pad_token = pad if pad in tok.get_vocab() else tok.eos_token
    tok.padding_side = "right"
    return tok


def check_device(hw: HardwareConfig) -> None:
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise SigilError(f"hardware={hw.name} needs a CUDA GPU but torch sees none on this machine; "
                         "use hardware=cpu (or `make demo`, which runs experiment=smoke on the CPU).")


def bnb_config(q: QuantConfig):
    from transformers import BitsAndBytesConfig

    if q.method == "none":
        return None
    if q.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.method, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype], bnb_4bit_quant_storage=DTYPES.get(q.quant_storage, torch.uint8),
    )


def load_base_model(cfg: ModelConfig, q: QuantConfig, hw: HardwareConfig, path: str | None = None):
    """The frozen base, loaded through the same `from_pretrained` path for every model."""
    from transformers import AutoModelForCausalLM

    check_device(hw)
    path = path or resolve_model_path(cfg)
    if hw.attn_implementation == "sdpa_varlen":
        from sigil_exp.attention import register_sdpa_varlen

        register_sdpa_varlen()
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=cfg.revision if not Path(path).is_dir() else None, quantization_config=bnb_config(q),
        dtype=DTYPES[q.compute_dtype], device_map=device_map(hw.device),
        attn_implementation=hw.attn_implementation, trust_remote_code=cfg.trust_remote_code,
    )
    if hw.liger_kernel:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError:
            raise SigilError("hardware.liger_kernel=true needs liger-kernel: `pip install -e .[fast]`, "
                             "or set hardware.liger_kernel=false.") from None
        apply_liger_kernel_to_llama(model=model)
    return model


def prepare_for_training(model, q: QuantConfig, hw: HardwareConfig):
    """Gradient checkpointing and input grads; the fp32 upcast of norms/embeddings/lm_head is a knob."""
    ckpt_kwargs = {"use_reentrant": hw.checkpointing_reentrant}
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False  # training never reads the KV cache
    if q.method != "none" and hw.upcast_non_lora:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=hw.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=ckpt_kwargs)
    for p in model.parameters():
        p.requires_grad_(False)
    if hw.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    return model


def peft_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    init: Any = True if lora.init_weights == "default" else lora.init_weights
    return PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias=lora.bias, use_rslora=lora.use_rslora, use_dora=lora.use_dora, init_lora_weights=init,
        task_type="CAUSAL_LM",
    )


def attach_lora(model, lora: LoraConfig, init_adapter: str | None = None, fused: bool = False):
    """New LoRA adapters, or (phase 2) the given adapter loaded trainable.

    `fused` (`hardware.lora_fused`) swaps each LoRA layer's forward for one autograd op (see
    `fuse_lora`); the adapter, its names and saving are peft's."""
    from peft import PeftModel, get_peft_model

    if init_adapter:
        path = Path(init_adapter).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise SigilError(f"train.init_adapter={init_adapter} holds no adapter_config.json; "
                             "point it at a run's adapter folder (outputs/<run>/adapter).")
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
    else:
        peft_model = get_peft_model(model, peft_config(lora))
    if fused:
        n = fuse_lora(peft_model)
        log.info("hardware.lora_fused: %d LoRA layers run as one fused op each", n)
    return peft_model


def build_trainable_model(cfg: ModelConfig, q: QuantConfig, lora: LoraConfig, hw: HardwareConfig,
                          path: str | None = None, init_adapter: str | None = None, lora_seed: int | None = None):
    """load -> prepare -> attach, as training and the benchmark both build the model.

    `lora_seed` seeds the RNG right before the adapters are created, so every preset starts from
    the same LoRA initialisation whatever its load path consumed."""
    model = prepare_for_training(load_base_model(cfg, q, hw, path), q, hw)
    if lora_seed is not None:
        torch.manual_seed(lora_seed)
    return attach_lora(model, lora, init_adapter, fused=hw.lora_fused)


def set_adapter_dtype(model, dtype: str) -> None:
    """Store the trainable (LoRA) weights in `dtype`. trl casts them to bf16 for quantised bases;
    float32 keeps fp32 master weights while autocast still computes in bf16."""
    target = DTYPES[dtype]
    for p in model.parameters():
        if p.requires_grad and p.dtype != target:
            p.data = p.data.to(target)


def load_adapter_weights(model, adapter_dir: str | Path) -> None:
    """The saved adapter's exact weights into the model's LoRA parameters (keeping their dtype): trl
    casts a quantised model's adapter to bf16 when the trainer is built, which rounds a phase-1 adapter
    that `set_adapter_dtype` alone cannot bring back."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir).expanduser() / "adapter_model.safetensors"))
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    set_peft_model_state_dict(model, state)
    for n, p in model.named_parameters():
        if n in dtypes and p.dtype != dtypes[n]:
            p.data = p.data.to(dtypes[n])


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as the parameters they stand for."""
    return model.get_nb_trainable_parameters()


def quantized_linear_count(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) for m in model.modules())


# ------------------------------------------------------------------------------- fused LoRA op
# peft's LoRA layer on a 4-bit base runs `base(x).clone() + lora_B(lora_A(dropout(x))) * scaling`:
# six kernels and four full passes over the output, a dropout copy + mask of the input saved per
# projection (q, k and v each keep their own), and the base matmul's dequantisation done by
# bitsandbytes. `_LoraLinear` computes the same function as one autograd op:
#   forward   y = x W^T;  y += s * (drop(x) A^T) B^T          (one GEMM + two thin GEMMs, addmm in place)
#   backward  dx = dy W + s * drop'((dy B) A);  dA = s (dy B)^T drop(x);  dB = s dy^T (drop(x) A^T)
# It saves only x (shared by q/k/v and by gate/up) and the thin x A^T; the dropout mask is
# regenerated in backward from the saved RNG state, as activation checkpointing does.
# W is dequantised with bitsandbytes' own kernel in forward and again in backward (the 4-bit base
# stays the only stored copy of the frozen weights).


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _dropout_scale(like: torch.Tensor, p: float, state=None) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p)) for `like`. Forward (state=None) draws it from the
    global RNG like nn.Dropout would; backward passes the state saved before that draw to get the
    same mask again without touching the global RNG."""
    if state is None:
        return torch.nn.functional.dropout(torch.ones_like(like), p, training=True)
    dev = like.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], device_type=dev.type):
        if dev.type == "cuda":
            torch.cuda.set_rng_state(state, dev)
        else:
            torch.set_rng_state(state)
        return torch.nn.functional.dropout(torch.ones_like(like), p, training=True)


def _dense_weight(weight, quant_state, dtype) -> torch.Tensor:
    if quant_state is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    import bitsandbytes.functional as bnbf

    w = bnbf.dequantize_4bit(weight, quant_state)
    return w if w.dtype == dtype else w.to(dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, quant_state, lora_a, lora_b, scaling: float, p: float, dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        w = _dense_weight(weight, quant_state, dtype)
        y = torch.mm(x2, w.t())
        del w
        state = None
        if p > 0.0:
            state = _rng_state(x2.device)
            xa = torch.mm(x2 * _dropout_scale(x2, p), a.t())
        else:
            xa = torch.mm(x2, a.t())
        y.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x, lora_a, lora_b, xa)
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.p, ctx.state, ctx.dtype = weight, quant_state, scaling, p, state, dtype
        return y.view(*shape[:-1], y.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, lora_a, lora_b, xa = ctx.saved_tensors
        dtype, s = ctx.dtype, ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != dtype:
            dy2 = dy2.to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        g = torch.mm(dy2, b)  # [M, r]; the LoRA scale is applied below
        d_b = torch.mm(dy2.t(), xa).mul_(s).to(lora_b.dtype) if need_b else None
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        mult = _dropout_scale(x2, ctx.p, ctx.state) if ctx.p > 0.0 else None
        d_a = None
        if need_a:
            xd = x2 if mult is None else x2 * mult
            d_a = torch.mm(g.t(), xd).mul_(s).to(lora_a.dtype)
        dx = None
        if need_x:
            w = _dense_weight(ctx.weight, ctx.quant_state, dtype)
            dx = torch.mm(dy2, w)
            del w
            if mult is None:
                dx.addmm_(g, a, alpha=s)
            else:
                dx.addcmul_(torch.mm(g, a), mult, value=s)
            dx = dx.view(x.shape).to(x.dtype)
        return dx, None, None, d_a, d_b, None, None, None


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward of a fused peft LoRA layer; anything unusual takes peft's own path."""
    import bitsandbytes as bnb

    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    base = self.base_layer
    plain = (
        not args and not kwargs and name is not None and not self.disable_adapters and not self.merged
        and name in self.lora_A and name not in getattr(self, "lora_variant", {})
        and getattr(base, "bias", None) is None
    )
    if plain and isinstance(base, bnb.nn.Linear4bit):
        bnb.nn.modules.fix_4bit_weight_quant_state_from_module(base)
        weight, qs = base.weight, base.weight.quant_state
        dtype = base.compute_dtype or qs.dtype
    elif plain and type(base) is torch.nn.Linear:
        weight, qs, dtype = base.weight, None, base.weight.dtype
    else:
        return type(self).forward(self, x, *args, **kwargs)
    drop = self.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and self.training else 0.0
    return _LoraLinear.apply(x, weight, qs, self.lora_A[name].weight, self.lora_B[name].weight,
                             float(self.scaling[name]), p, dtype)


def fuse_lora(model) -> int:
    """Route every plain LoRA layer (4-bit or bf16 base, one adapter, no DoRA, no bias) through
    `_LoraLinear`. Returns how many layers were switched; the others keep peft's forward."""
    import types

    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer") and not getattr(module, "use_dora", {}).get(
                module.active_adapters[0] if module.active_adapters else "", False):
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    return n
