"""The evaluation's own decode loop (`eval.compile=false`, the default): one batch of rows
(every sample of every problem, as many as memory allows), each problem's prompt prefilled once
and shared by its samples, every row stopped on its own (EOS, or the function's closing brace) and
dropped from the batch, KV cache included, as rows finish. The KV cache is allocated once for the
prompt plus max_new_tokens and written in place (`_BufferLayer`); each step's attention reads views.

Greedy picks the argmax of the same float32 logits transformers' `generate` uses; sampling applies
temperature then top-p as transformers' warpers do, from a seeded generator.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer


@dataclass(frozen=True)
class DecodeParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    prefill_tokens: int = 8192  # prompt tokens per prefill forward: bounds its activation memory
    ignore_stop: bool = False  # benchmarks on random weights: no EOS (suppressed) or brace stop, every row runs to the end


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); pass whichever the model takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _preallocated(caches: list, config, sel: torch.Tensor, capacity: int):
    """One DynamicCache for the decode: row i holds the prefill of prompt sel[i] (the chunks' caches
    concatenated, then selected), in buffers of `capacity` positions allocated once (`_BufferLayer`)."""
    from transformers import DynamicCache

    out = DynamicCache(config=config)
    for i in range(len(caches[0].layers)):
        keys, values = (torch.cat([getattr(c.layers[i], a) for c in caches]) for a in ("keys", "values"))
        for c in caches:  # free the chunk's layer as soon as it is copied
            c.layers[i].keys = c.layers[i].values = None
        out.layers[i] = _BufferLayer(keys[sel], values[sel], capacity)
    return out


class _BufferLayer(DynamicLayer):
    """A DynamicLayer that writes each step's keys/values in place into buffers of `capacity`
    positions and hands attention views of the filled part. DynamicLayer's `torch.cat` copies the
    whole cache, every layer, every step: at 620 rows of 8B shapes that is tens of GB per step."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.dtype, self.device, self.n = keys.dtype, keys.device, keys.shape[-2]
        shape = (*keys.shape[:-2], max(capacity, self.n), keys.shape[-1])
        self.buf_k, self.buf_v = keys.new_empty(shape), values.new_empty(shape)
        self.buf_k[..., :self.n, :] = keys
        self.buf_v[..., :self.n, :] = values
        self._views()
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self.buf_k[..., :self.n, :], self.buf_v[..., :self.n, :]

    def update(self, key_states, value_states, *args, **kwargs):
        q = key_states.shape[-2]  # decode_batch plans the capacity: prompt width + max_new_tokens
        self.buf_k[..., self.n:self.n + q, :] = key_states
        self.buf_v[..., self.n:self.n + q, :] = value_states
        self.n += q
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.buf_k, self.buf_v = self.buf_k[indices], self.buf_v[indices]
        self._views()


def choose(logits: torch.Tensor, p: DecodeParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from float32 logits [rows, vocab]."""
    if p.ignore_stop and p.eos_ids:
        logits[:, list(p.eos_ids)] = float("-inf")
    if p.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / p.temperature
    if p.top_p < 1.0:  # transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep >= 1
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= (1 - p.top_p)
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def decode_batch(model, prompts: list[list[int]], row_prompt: list[int], p: DecodeParams,
                 stop: Callable[[int, list[int]], bool] | None = None, stop_candidates: Collection[int] = (),
                 generator: torch.Generator | None = None) -> list[list[int]]:
    """Generated token ids for each row; row i continues prompts[row_prompt[i]].

    `stop(row, ids)` is asked only when a row's newest token is in `stop_candidates` (tokens that
    hold a `}`); a row also ends on an EOS id (kept in its ids) or at max_new_tokens."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    config = model.config
    kw = cache_kwarg(model)
    width = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), width), p.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    ids, mask = ids.to(device), mask.to(device)

    caches, logits = [], []
    step = max(1, p.prefill_tokens // width)
    for s in range(0, len(prompts), step):  # prefill each distinct prompt once, in chunks
        c = DynamicCache(config=config)
        m = mask[s:s + step]
        out = model(input_ids=ids[s:s + step], attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1, **{kw: c})
        logits.append(out.logits[:, -1].float())
        caches.append(c)
    sel = torch.tensor(row_prompt, device=device)  # the samples of a problem share its prefill
    cache = _preallocated(caches, config, sel, width + p.max_new_tokens)
    del caches, out
    mask, logits = mask[sel], torch.cat(logits)[sel]
    pos = mask.sum(-1) - 1

    eos, cands = set(p.eos_ids), set(stop_candidates)
    out_ids: list[list[int]] = [[] for _ in row_prompt]
    finished = [False] * len(row_prompt)
    rows = list(range(len(row_prompt)))  # batch position -> row
    for t in range(p.max_new_tokens):
        tok = choose(logits, p, generator)
        for r, tk in zip(rows, tok.tolist(), strict=True):
            if finished[r]:
                continue  # done, waiting to be dropped: its token is not used
            out_ids[r].append(tk)
            if len(out_ids[r]) >= p.max_new_tokens:
                finished[r] = True
            elif not p.ignore_stop and (tk in eos or (tk in cands and stop is not None and stop(r, out_ids[r]))):
                finished[r] = True
        alive = [j for j, r in enumerate(rows) if not finished[r]]
        if not alive or t == p.max_new_tokens - 1:
            break
        if len(rows) - len(alive) >= max(1, len(rows) // 8):  # drop finished rows (a copy of the cache: batched)
            keep = torch.tensor(alive, device=device)
            cache.batch_select_indices(keep)
            mask, pos, tok = mask[keep], pos[keep], tok[keep]
            rows = [rows[j] for j in alive]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        pos = pos + 1
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                    **{kw: cache})
        logits = out.logits[:, -1].float()
    return out_ids
