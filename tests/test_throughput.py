"""The speed figures every run reports: steady-state tokens/s (warm-up excluded) and the FLOPs behind MFU."""

from __future__ import annotations

import pytest

from sigil_exp.throughput import StepClock, flops_per_token, packed_attn_span

SHAPE_8B = dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)


def test_steady_state_excludes_warmup_steps():
    clock = StepClock("cpu")
    # train begin at t=0, then a slow first two steps (compile, allocator growth) and 4 steady 1-second steps
    for step, (t, tokens) in enumerate([(0, 0), (10, 100), (15, 200), (16, 300), (17, 400), (18, 500), (19, 600)]):
        clock.marks.append((step, float(t), tokens))
    s = clock.steady(warmup=2)
    assert s["train/tokens_per_s"] == pytest.approx(400 / 4) and s["train/step_s"] == pytest.approx(1.0)
    assert s["train/steady_steps"] == 4 and s["train/warmup_steps_excluded"] == 2
    short = StepClock("cpu")
    short.marks = [(0, 0.0, 0), (1, 2.0, 50)]  # one step: nothing can be excluded, but there is a figure
    assert short.steady()["train/tokens_per_s"] == pytest.approx(25) and short.steady()["train/warmup_steps_excluded"] == 0
    assert StepClock("cpu").steady() == {}


def test_attention_span_of_packed_documents():
    # one full row of S tokens: span S+1 (2 x the mean keys per query); short documents attend to less
    assert packed_attn_span([2048], 2048) == pytest.approx(2049)
    assert packed_attn_span([100, 100], 2048) == pytest.approx(101)
    # a document longer than max_len is trained as its chunks
    assert packed_attn_span([4096], 2048) == pytest.approx(2049)
    f_full = flops_per_token(SHAPE_8B, 0, 2048, checkpointing=False)
    f_short = flops_per_token(SHAPE_8B, 0, 2048, checkpointing=False, attn_span=packed_attn_span([580] * 10, 2048))
    attn_full = 3 * 2 * 32 * 32 * 128 * 2049
    assert f_full["model_flops_per_token"] - f_short["model_flops_per_token"] == pytest.approx(
        attn_full * (1 - 581 / 2049), rel=1e-6)
