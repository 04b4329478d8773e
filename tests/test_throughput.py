"""The speed figures every run reports: steady-state tokens/s (warm-up excluded) and the FLOPs behind MFU."""

from __future__ import annotations

import pytest

from sigil_exp.throughput import StepClock, flops_per_token, packed_attn_span

SHAPE_8B = dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)


def test_steady_state_excludes_warmup_steps_and_time_between_steps():
    clock = StepClock("cpu")
    # (start, end, tokens at start, tokens at end): two slow first steps (allocator growth, first shapes),
    # then four 1-second steps of 100 tokens with 30 s between two of them (a checkpoint save or an eval)
    clock.steps = [(0, 10, 0, 100), (10, 15, 100, 200), (15, 16, 200, 300), (16, 17, 300, 400),
                   (47, 48, 400, 500), (48, 49, 500, 600)]
    s = clock.steady(warmup=2)
    assert s["train/tokens_per_s"] == pytest.approx(400 / 4) and s["train/step_s"] == pytest.approx(1.0)
    assert s["train/steady_steps"] == 4 and s["train/warmup_steps_excluded"] == 2
    assert clock.window(4) == (2, 200)
    short = StepClock("cpu")
    short.steps = [(0.0, 2.0, 0, 50)]  # one step: nothing can be excluded, but there is a figure
    assert short.steady()["train/tokens_per_s"] == pytest.approx(25) and short.steady()["train/warmup_steps_excluded"] == 0
    assert StepClock("cpu").steady() == {}
    live = StepClock("cpu")
    live.begin(0)
    live.end(64)
    assert len(live.steps) == 1 and live.steps[0][3] == 64 and live.steps[0][1] >= live.steps[0][0]


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
