"""`attn_implementation="sdpa_varlen"`: sdpa, with causal attention per packed document in training and
grouped-query decoding without copies in generation; registered with transformers' attention
interface (`register_sdpa_varlen`, called by `model.load_base_model` and the evaluation's loaders)."""

from __future__ import annotations

from typing import Any

import torch

# --------------------------------------------------------------------- packed-sequence attention
# With packing, trl flattens a micro-batch into one row with per-document position ids and passes the
# document boundaries (`cu_seq_lens_q`, `max_length_q`). Under `sdpa`, transformers builds a
# (B*S) x (B*S) block-diagonal mask and SDPA runs its masked kernel over the whole square: at
# micro-batch 8 x 2048 that is 16x the causal attention work and a 268 MB mask per step.
# `sdpa_varlen` instead runs causal attention per document:
#   - on CUDA, one call per layer to torch's variable-length flash attention
#     (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10), GQA native;
#   - where that is missing (older torch, fp32, CPU), causal SDPA once per document; on CUDA the
#     cuDNN backend is kept out of that loop because it builds a new plan for every new sequence
#     length (real documents have hundreds of distinct lengths: 4.3k instead of 11.4k tokens/s).
# Padded batches (a 2-D attention mask) take the plain sdpa path, except one decode step of a GQA model:
#
# ------------------------------------------------------------------ grouped-query decode step
# With a padding mask transformers' sdpa path copies every K/V head once per query head it serves
# (`repeat_kv`: Llama 3 8B has 32 query and 8 KV heads, so 4x the whole KV cache is written and read
# again, each layer, each step; masked SDPA would fall back to its math kernel with `enable_gqa`). In
# a decode step each row has one query per head, so the 4 query heads of a group are stacked as 4
# query positions of their KV head: SDPA([B, 8, 4, D] x [B, 8, L, D]) with the row's [B, 1, 1, L]
# mask, the same attention with the cache read once and nothing copied (`_grouped_decode`). cuDNN is kept
# out here too: every decode step has a new cache length, and its planning made the H200 wait on the CPU.

_CU_CACHE: list = [None, None]  # [weakref to the last cu_seq_lens tensor, its boundaries as a list]
_VARLEN: dict[str, Any] = {}  # resolved once: the function and the keywords this torch version takes


def _boundaries(cu: torch.Tensor) -> list[int]:
    import weakref

    ref, val = _CU_CACHE
    if ref is not None and ref() is cu:
        return val
    val = [int(v) for v in cu.tolist()]  # one host sync per step (the tensor is reused by every layer)
    _CU_CACHE[0], _CU_CACHE[1] = weakref.ref(cu), val
    return val


def _varlen_attn():
    """(varlen_attn, causal keywords, takes enable_gqa, takes scale) or None where torch has none."""
    if "fn" not in _VARLEN:
        import inspect

        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN["fn"] = None
            return None
        params = inspect.signature(varlen_attn).parameters
        causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        _VARLEN.update(fn=varlen_attn, causal=causal, gqa="enable_gqa" in params, scale="scale" in params)
    return None if _VARLEN["fn"] is None else _VARLEN


def _flash_varlen(query, key, value, cu: torch.Tensor, max_len: int, scaling) -> torch.Tensor | None:
    """All documents of the packed row in one flash call; None where this torch/dtype cannot."""
    v = _varlen_attn()
    if v is None or query.device.type != "cuda" or query.dtype not in (torch.bfloat16, torch.float16):
        return None
    default_scale = query.shape[-1] ** -0.5
    if scaling is not None and abs(scaling - default_scale) > 1e-6 * default_scale and not v["scale"]:
        return None
    q, k, val = (t[0].transpose(0, 1) for t in (query, key, value))  # [1, H, T, D] -> [T, H, D]
    kw = dict(v["causal"])
    if k.shape[1] != q.shape[1]:
        if v["gqa"]:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, val = k.repeat_interleave(rep, dim=1), val.repeat_interleave(rep, dim=1)
    if v["scale"] and scaling is not None:
        kw["scale"] = scaling
    cu = cu.to(device=q.device, dtype=torch.int32)
    return v["fn"](q, k, val, cu, cu, max_len, max_len, **kw).unsqueeze(0)  # [1, T, H, D]


def _no_cudnn(device: torch.device):
    """The SDPA backends allowed in the per-document loop: on CUDA, everything but cuDNN."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    max_len = kwargs.pop("max_length_q", None)
    for k in ("cu_seq_lens_k", "max_length_k", "seq_idx"):
        kwargs.pop(k, None)
    q_len = query.shape[2]
    if q_len == 1 and key.shape[1] < query.shape[1] and attention_mask is not None and dropout == 0.0:
        return _grouped_decode(query, key, value, attention_mask, scaling), None
    if attention_mask is not None or cu is None or query.shape[0] != 1 or key.shape[2] != q_len:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    bounds = _boundaries(cu)
    if bounds[-1] != q_len:  # boundaries that do not describe this row: no packing information to use
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=False) if e > s]
    if dropout == 0.0:
        out = _flash_varlen(query, key, value, cu, int(max_len or max(lengths)), scaling)
        if out is not None:
            return out, None
    if len(set(lengths)) == 1:  # equal documents: fold them into the batch dimension, one call
        n, length = len(lengths), lengths[0]

        def fold(t):
            return t[0].unflatten(1, (n, length)).transpose(0, 1)  # [H, T, D] -> [n, H, L, D]

        out, _ = sdpa_attention_forward(module, fold(query), fold(key), fold(value), None, dropout=dropout,
                                        scaling=scaling, is_causal=True, **kwargs)
        return out.reshape(1, q_len, *out.shape[2:]), None
    outs = []
    with _no_cudnn(query.device):
        for s, e in zip(bounds[:-1], bounds[1:], strict=False):
            if e > s:
                o, _ = sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                              dropout=dropout, scaling=scaling, is_causal=True, **kwargs)
                outs.append(o)
    return torch.cat(outs, dim=1), None


def _grouped_decode(query, key, value, attention_mask, scaling) -> torch.Tensor:
    """One decode step of grouped-query attention: query [B, H, 1, D], key/value [B, Hkv, L, D], mask
    [B, 1, 1, L] (bool: attend, or additive). Query head h reads KV head h // (H / Hkv), as `repeat_kv`
    pairs them. Returns [B, 1, H, D] (transformers' layout after attention)."""
    b, h, _, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, h // hkv, d)  # the heads of a group as query positions of their KV head
    mask = attention_mask[:, :, -1:, : key.shape[2]]  # [B, 1, 1, L]: broadcast over KV heads and the group
    with _no_cudnn(query.device):  # cuDNN plans anew for every cache length: 1.3 ms of CPU per layer per step
        out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, h, 1, d).transpose(1, 2)


def _varlen_mask(*args, **kwargs):
    """sdpa's mask, except for batches without a padding mask (packed or plain causal): none at all."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register_sdpa_varlen() -> None:
    """Register `attn_implementation="sdpa_varlen"` with transformers' attention and mask interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("sdpa_varlen", sdpa_varlen_attention)
    AttentionMaskInterface.register("sdpa_varlen", _varlen_mask)
