"""Training speed as users should read it: steady-state tokens/s (warm-up steps excluded), step time,
model FLOPs per token and MFU against the card's measured bf16 matmul peak.

Used by the trainer's metrics callback (metrics.json, W&B) and by the benchmark, so a sweep's speed
column and the benchmark's table are the same number computed the same way.

FLOPs. N = parameters of all linear projections + lm_head (7.50e9 at Llama-3.1-8B). Per token:
model FLOPs = 2N forward + 2N backward (activation gradients only: the base is frozen) + 6 x LoRA
params + causal attention 3 x 2 * L * n_heads * head_dim * span, where span = 2 x the mean number of
keys a token attends to (S+1 for a full causal row of S tokens; for packed documents of lengths L_i,
sum L_i (L_i + 1) / sum L_i). Hardware FLOPs add the recomputed forward with gradient checkpointing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from typing import Any

import torch

WARMUP_STEPS = 2  # steps excluded from the steady-state figures (allocator growth, autotuning, first shapes)


def flops_per_token(shape: Any, lora_params: int, seq: int, checkpointing: bool,
                    attn_span: float | None = None) -> dict[str, float]:
    """Model and hardware FLOPs per trained token; `shape` is a preflight.ModelShape or its dict."""
    from sigil_exp.preflight import ModelShape

    s = shape if isinstance(shape, ModelShape) else ModelShape(**shape)
    n = s.matmul_params
    span = float(seq + 1) if attn_span is None else float(attn_span)
    attn_fwd = 2 * s.layers * s.heads * s.hd * span  # QK^T and AV, 2 FLOP/MAC, span/2 keys on average
    model = 4 * n + 6 * lora_params + 3 * attn_fwd
    hardware = model + ((2 * n + 2 * lora_params + attn_fwd) if checkpointing else 0)
    return {"N_matmul": n, "model_flops_per_token": model, "hardware_flops_per_token": hardware,
            "attn_span": span}


def packed_attn_span(lengths: Iterable[int], max_len: int) -> float:
    """2 x the mean keys per token for documents trained separately (packing keeps them apart); a
    document longer than max_len counts as its max_len chunks."""
    num = den = 0
    for n in lengths:
        full, rest = divmod(int(n), max_len)
        num += full * max_len * (max_len + 1) + rest * (rest + 1)
        den += n
    return num / den if den else float(max_len + 1)


def dataset_lengths(ds) -> list[int]:
    """Token counts of a datasets.Dataset's input_ids column, read from the Arrow offsets."""
    import pyarrow.compute as pc

    col = ds.data.column("input_ids")
    return [int(x) for chunk in col.chunks for x in pc.list_value_length(chunk).to_pylist()]


def measure_peak_tflops(device: str = "cuda", n: int = 8192, reps: int = 10) -> float | None:
    """This card's bf16 matmul rate now (the MFU denominator); None off CUDA."""
    if device != "cuda" or not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        a @ b
    e1.record()
    e1.synchronize()
    tflops = reps * 2 * n ** 3 / (e0.elapsed_time(e1) / 1e3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return round(tflops, 1)


class StepClock:
    """Wall time and tokens of every optimizer step, from its start to its end, the device
    synchronised at both (a step's time is the step's work, not the host running ahead). What runs
    between two steps (logging, checkpoint saves, evaluation during training) is not a step's time."""

    def __init__(self, device: str):
        self.cuda = device == "cuda" and torch.cuda.is_available()
        self.steps: list[tuple[float, float, int, int]] = []  # (start s, end s, tokens at start, tokens at end)
        self._open: tuple[float, int] | None = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self, tokens: int) -> None:
        self._open = (self._now(), tokens)

    def end(self, tokens: int) -> None:
        if self._open is not None:
            self.steps.append((self._open[0], self._now(), self._open[1], tokens))
            self._open = None

    def window(self, since: int) -> tuple[float, int]:
        """(seconds, tokens) of the steps from index `since` on."""
        done = self.steps[since:]
        return sum(e - b for b, e, _, _ in done), sum(t1 - t0 for _, _, t0, t1 in done)

    def steady(self, warmup: int = WARMUP_STEPS) -> dict[str, Any]:
        """tokens/s and median step time over the steps after the first `warmup` (fewer are excluded
        when the run is short: at least one step is kept)."""
        if not self.steps:
            return {}
        w = min(warmup, len(self.steps) - 1)
        seconds, tokens = self.window(w)
        return {"train/tokens_per_s": tokens / seconds if seconds > 0 else None,
                "train/step_s": statistics.median(e - b for b, e, _, _ in self.steps[w:]),
                "train/steady_steps": len(self.steps) - w, "train/warmup_steps_excluded": w}


def speed_metrics(clock: StepClock, shape: Any, lora_params: int, seq: int, checkpointing: bool,
                  lengths: list[int] | None, peak_tflops: float | None, world: int = 1) -> dict[str, Any]:
    """The steady-state figures of a finished run (tokens/s: the whole job's), with MFU per GPU where
    a peak was measured (CUDA)."""
    out = clock.steady()
    tps = out.get("train/tokens_per_s")
    if tps and shape is not None:
        span = packed_attn_span(lengths, seq) if lengths else None
        fl = flops_per_token(shape, lora_params, seq, checkpointing, span)
        out["perf/model_flops_per_token"] = fl["model_flops_per_token"]
        if peak_tflops:
            out["sys/peak_tflops"] = peak_tflops
            out["train/mfu"] = tps * fl["model_flops_per_token"] / (peak_tflops * 1e12 * world)  # per GPU
    return out
