"""Merging a LoRA adapter into full-precision weights: one set of functions for the export
(`python -m sigil_exp.export`) and for evaluation's full-precision generation copy
(`full_precision_copy`: the adapter merged, or kept beside the dequantised weights).

    adapter (peft state dict + adapter_config.json) --lora_deltas()--> {module name: LoraDelta}
    base weight: the checkpoint's, NF4-roundtripped (`nf4_roundtrip`) or as is (`original`),
                 or dequantised from a live 4-bit layer (evaluation; the same values)
        --merged_weight(w, delta)--> W + s * B @ A   (DoRA: each output row rescaled to the trained magnitude)

The arithmetic is float32 with one rounding to the target dtype at the end. Nothing is ever
merged into 4-bit weights and re-quantised: the result is a plain full-precision checkpoint.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sigil_exp.attention import register_sdpa_varlen
from sigil_exp.config import QuantConfig, SigilError

log = logging.getLogger(__name__)

_PREFIX = "base_model.model."
# adapter_config.json keys that change what the adapter computes beyond W + s*B@A: merging would be wrong.
_UNMERGEABLE = ("use_qalora", "lora_bias", "layer_replication", "modules_to_save", "trainable_token_indices",
                "target_parameters", "alora_invocation_tokens", "use_bdlora", "arrow_config", "kasa_config",
                "velora_config", "monteclora_config", "megatron_config")
_PLAIN_INIT = (True, False, "gaussian", "true", "false")


@dataclass
class LoraDelta:
    """One adapted linear layer: delta = scaling * b @ a (transposed when fan_in_fan_out)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float
    magnitude: torch.Tensor | None = None  # DoRA: the trained norm of each output row
    fan_in_fan_out: bool = False


def check_mergeable(config: Mapping[str, Any], where: str) -> None:
    """Refuse, in one sentence, an adapter whose function is not base + s*B@A (+ DoRA's rescale)."""
    kind = config.get("peft_type", "LORA")
    kind = str(getattr(kind, "value", kind))  # an enum in a live peft config, a string in adapter_config.json
    if kind.upper() != "LORA":
        raise SigilError(f"{where} is a {kind} adapter; only LoRA (incl. rsLoRA and DoRA) "
                         "adapters can be merged.")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INIT:
        raise SigilError(f"{where} was initialised with init_lora_weights={init!r}, which rewrites the base weights "
                         "during training, so adding it to the run's base gives another model; convert it with "
                         "peft's path_initial_model_for_weight_conversion or train with lora.init_weights=default.")
    for key in _UNMERGEABLE:
        if config.get(key):
            raise SigilError(f"{where} sets {key}={config[key]!r}, which sigil_exp cannot merge into a plain "
                             "checkpoint; evaluate or serve it as an adapter (base + peft) instead.")


def lora_deltas(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str) -> dict[str, LoraDelta]:
    """The adapter's per-module deltas from a peft state dict (`adapter_model.safetensors` or
    `get_peft_model_state_dict`) and its adapter_config.json, keyed by the base model's module names."""
    check_mergeable(config, where)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key.removeprefix(_PREFIX)
        for suffix, part in ((".lora_A.weight", "a"), (".lora_B.weight", "b"), (".lora_magnitude_vector", "m"),
                             (".lora_magnitude_vector.weight", "m")):
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[part] = value
                break
        else:
            raise SigilError(f"{where} holds {key}, which is not a LoRA A/B matrix or DoRA magnitude (embedding "
                             "adapters, trained biases, modules_to_save); it cannot be merged by sigil_exp.")
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    deltas = {}
    for module, p in parts.items():
        if "a" not in p or "b" not in p:
            raise SigilError(f"{where} has an incomplete LoRA pair for {module} (lora_A or lora_B missing); "
                             "re-save the adapter.")
        r = p["a"].shape[0]
        a = float(alpha_pattern[_pattern_key(alpha_pattern, module)]) if alpha_pattern else alpha
        deltas[module] = LoraDelta(a=p["a"], b=p["b"], scaling=a / (r ** 0.5 if rslora else r), magnitude=p.get("m"),
                                   fan_in_fan_out=bool(config.get("fan_in_fan_out", False)))
    return deltas


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str:
    """peft's rule for rank/alpha patterns: a key matches a module name's dotted suffix."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return "__none__" if "__none__" in patterns else next(iter(patterns))


def peft_deltas(model) -> dict[str, LoraDelta]:
    """The deltas of a live peft model's active adapter (what training just produced)."""
    from peft import get_peft_model_state_dict

    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    state = get_peft_model_state_dict(model, adapter_name=name)
    return lora_deltas(state, model.peft_config[name].to_dict(), "the trained adapter")


def merged_weight(w: torch.Tensor, delta: LoraDelta | None, dtype: torch.dtype) -> torch.Tensor:
    """W + s * B @ A in float32 (DoRA: rows rescaled to magnitude / ||W + s*B@A||), rounded once to `dtype`."""
    out = w.to(torch.float32, copy=True)
    if delta is not None:
        d = (delta.b.to(out.device, torch.float32) @ delta.a.to(out.device, torch.float32)).mul_(delta.scaling)
        out += d.T if delta.fan_in_fan_out else d
        if delta.magnitude is not None:
            rows = out.T if delta.fan_in_fan_out else out
            rows *= (delta.magnitude.to(out.device, torch.float32) / torch.linalg.norm(rows, dim=1)).unsqueeze(1)
    return out.to(dtype)


# ------------------------------------------------------------------------------ 4-bit weights
def nf4_roundtrip(w: torch.Tensor, q: QuantConfig) -> torch.Tensor:
    """`w` quantised and dequantised exactly as `from_pretrained(quantization_config=...)` stores it
    for the run (bitsandbytes' default blocksize, quant type, double quant): the weights training saw."""
    import bitsandbytes.functional as bnbf

    from sigil_exp.model import DTYPES

    packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=None, compress_statistics=q.double_quant,
                                       quant_type=q.method, quant_storage=DTYPES.get(q.quant_storage, torch.uint8))
    return bnbf.dequantize_4bit(packed, state)


def dequantized_weight(module) -> torch.Tensor:
    """The full-precision weight a live linear layer computes with (4-bit layers dequantised)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    if isinstance(module, bnb.nn.Linear4bit):
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' AVX512-BF16 CPU layout: undo it
            module.weight.data, state = bnbf._convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            module.weight.quant_state = state
        return bnbf.dequantize_4bit(module.weight.data, state)
    if isinstance(module, bnb.nn.Linear8bitLt):
        raise SigilError("The base is int8 (quant=int8), whose outlier decomposition has no single dequantised "
                         "weight to merge into; set eval.weights=trained (or export with --merge-base original).")
    return module.weight


def quantized_linear_names(model) -> set[str]:
    """The nn.Linear modules that a 4-bit `from_pretrained` replaces (transformers' rule: every
    linear except the output embedding, tied and last modules)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
        skip = get_keys_to_not_convert(model)
    except (ImportError, AttributeError):  # other transformers versions: the output embedding
        out = model.get_output_embeddings()
        skip = [n for n, m in model.named_modules() if m is out]
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return {n for n, m in model.named_modules() if type(m) is torch.nn.Linear
            and not any(re.match(rf"(?:{k}){boundary}", n) or n.endswith(k) for k in skip)}


# ------------------------------------------------------------------------------ whole models
def merge_into(model, deltas: dict[str, LoraDelta], quant: QuantConfig | None, dtype: torch.dtype) -> dict[str, int]:
    """Export: merge in place into a model loaded in full precision. With `quant`, every linear
    the run held in 4-bit is NF4-roundtripped first. Returns counts for the log and the card."""
    rt = quantized_linear_names(model) if quant is not None and quant.method in ("nf4", "fp4") else set()
    left = dict(deltas)
    counts = {"roundtripped": 0, "merged": 0}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            delta = left.pop(name, None)
            if name not in rt and delta is None:
                continue
            w = nf4_roundtrip(module.weight.data, quant) if name in rt else module.weight.data
            module.weight.data = merged_weight(w, delta, dtype)
            counts["roundtripped"] += name in rt
            counts["merged"] += delta is not None
    if left:
        raise SigilError(f"The adapter targets {sorted(left)[0]}, which is not a linear layer of the base model; "
                         "export with the base the adapter was trained on (model.name_or_path in the run's config).")
    for p in model.parameters():  # parameters only: rotary inv_freq buffers stay float32, as transformers keeps them
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return counts


class LoraBeside(torch.nn.Module):
    """A linear layer with its LoRA adapter kept beside the weight instead of merged into it:
    y = x W^T + s (x A^T) B^T, with W the base weight as is (no rounding of W + s*B@A). [W; A] is one
    weight, so the base and the adapter's down-projection are one GEMM; one addmm adds the rest."""

    def __init__(self, weight: torch.Tensor, delta: LoraDelta, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.scaling = float(delta.scaling)
        a = delta.a.to(weight.device, weight.dtype)
        self.weight_a = torch.nn.Parameter(torch.cat([weight, a]), requires_grad=False)  # [out + r, in]
        self.lora_b_t = torch.nn.Parameter(delta.b.to(weight.device, weight.dtype).T.contiguous(),
                                           requires_grad=False)  # [r, out]
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight_a).reshape(-1, self.weight_a.shape[0])
        out = torch.addmm(y[:, :self.out_features], y[:, self.out_features:], self.lora_b_t, alpha=self.scaling)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)


def _beside(delta: LoraDelta | None) -> bool:
    """Whether a layer's adapter can be kept beside its weight (plain LoRA; DoRA rescales W + s*B@A)."""
    return delta is not None and delta.magnitude is None and not delta.fan_in_fan_out


def full_precision_copy(model, dtype: torch.dtype = torch.bfloat16, merge: bool = False):
    """Evaluation: a plain transformers model computing `model` (a peft model on a 4-bit or
    full-precision base) in `dtype`, built layer by layer from the weights already on the device, so
    only one full-precision layer exists besides the copy at any time.

    merge=False: every base weight is the dequantised one training multiplied by, and each adapter is
    computed beside it (`LoraBeside`; a DoRA layer is merged). merge=True: W + s*B@A rounded once to
    `dtype`, the weights `python -m sigil_exp.export` writes (one more rounding per weight)."""
    from transformers import AutoModelForCausalLM

    base = model.get_base_model()
    deltas = peft_deltas(model)
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._is_quantized = False
    config.use_cache = True
    register_sdpa_varlen()  # sdpa + copy-free grouped-query decode steps
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa_varlen")
    beside: dict[str, LoraDelta] = {}
    with torch.no_grad():
        for full, _param in list(plain.named_parameters()):
            mod_name, _, pname = full.rpartition(".")
            src = base.get_submodule(mod_name)
            src = getattr(src, "base_layer", src)  # a peft LoRA layer wraps the base linear
            if pname == "weight" and isinstance(plain.get_submodule(mod_name), torch.nn.Linear):
                delta = deltas.pop(mod_name, None)
                if not merge and _beside(delta):
                    beside[mod_name] = delta
                    delta = None
                value = merged_weight(dequantized_weight(src), delta, dtype)
            else:
                value = getattr(src, pname).detach().to(dtype, copy=True)
            plain.get_submodule(mod_name)._parameters[pname] = torch.nn.Parameter(value, requires_grad=False)
            if mod_name in beside and pname == "weight":
                lin = plain.get_submodule(mod_name)
                parent, _, child = mod_name.rpartition(".")
                setattr(plain.get_submodule(parent), child, LoraBeside(lin.weight, beside[mod_name], lin.bias))
                del lin
        for full, _ in list(plain.named_buffers()):
            mod_name, _, bname = full.rpartition(".")
            src = base.get_buffer(full)
            plain.get_submodule(mod_name)._buffers[bname] = src.detach().clone()
        for mod_name, mod in plain.named_modules():  # plain tensor attributes (rotary's original_inv_freq)
            for attr, val in list(vars(mod).items()):
                if isinstance(val, torch.Tensor) and val.is_meta:
                    setattr(mod, attr, getattr(base.get_submodule(mod_name), attr).detach().clone())
    if deltas:
        raise SigilError(f"The adapter targets {sorted(deltas)[0]}, which is not a linear layer of the model; "
                         "set eval.weights=trained.")
    plain.tie_weights()
    plain.eval()
    plain.generation_config = copy.deepcopy(base.generation_config)
    return plain


def compute_dtype(model) -> torch.dtype:
    """The dtype a (peft) model's linear layers multiply in: a 4-bit layer's compute dtype, else its weight's."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            return m.compute_dtype or m.weight.quant_state.dtype
        if type(m) is torch.nn.Linear and m.weight.is_floating_point():
            return m.weight.dtype
    return torch.bfloat16


def full_precision_bytes(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of `model`'s weights held in `dtype` (4-bit layers counted at their full size)."""
    import bitsandbytes as bnb

    size = torch.finfo(dtype).bits // 8
    n = 0
    for name, m in model.named_modules():
        if ".lora_" in name:  # the adapter itself is merged away
            continue
        if isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            n += m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
        else:
            n += sum(p.numel() for p in m.parameters(recurse=False))
    return n * size
