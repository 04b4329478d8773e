"""The benchmark's code path on the CPU: the fused LoRA op computes what peft computes, packed
attention keeps documents apart, and `python -m sigil_exp.bench --tiny` runs every row end to end."""

from __future__ import annotations

import json

import pytest
import torch

from sigil_exp import model as modeling
from sigil_exp.bench import SHAPES, build_random_model, flops_per_token
from sigil_exp.config import HardwareConfig, LoraConfig, ModelConfig, QuantConfig


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_random_model(SHAPES["tiny"], tmp_path_factory.mktemp("bench") / "model")


def _grads(tiny_dir, fused: bool, method: str, dropout: float):
    mc = ModelConfig(name="t", name_or_path=str(tiny_dir))
    q = QuantConfig(method=method, compute_dtype="float32")
    hw = HardwareConfig(name="t", device="cpu", precision="fp32", upcast_non_lora=False, gradient_checkpointing=False)
    torch.manual_seed(0)
    m = modeling.prepare_for_training(modeling.load_base_model(mc, q, hw, path=str(tiny_dir)), q, hw)
    torch.manual_seed(0)
    m = modeling.attach_lora(m, LoraConfig(dropout=dropout), fused=fused)
    with torch.no_grad():  # B starts at zero; give it values so every gradient path is exercised
        for i, (n, p) in enumerate(m.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    m.train()
    ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)  # same dropout masks for both paths
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,dropout", [("nf4", 0.0), ("nf4", 0.1), ("none", 0.1)])
def test_fused_lora_matches_peft(tiny_dir, method, dropout):
    l0, g0 = _grads(tiny_dir, False, method, dropout)
    l1, g1 = _grads(tiny_dir, True, method, dropout)
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == 2 * 7 * SHAPES["tiny"]["layers"]
    worst = max(float((g0[k] - g1[k]).norm() / g0[k].norm()) for k in g0)
    assert worst < 1e-4, worst


def test_fused_lora_is_applied_from_the_hardware_knob(tiny_dir):
    mc = ModelConfig(name="t", name_or_path=str(tiny_dir))
    q = QuantConfig()
    hw = HardwareConfig(name="t", device="cpu", upcast_non_lora=False, lora_fused=True)
    m = modeling.build_trainable_model(mc, q, LoraConfig(), hw)
    from peft.tuners.lora import LoraLayer

    layers = [mod for mod in m.modules() if isinstance(mod, LoraLayer)]
    assert layers and all(mod.forward.__func__ is modeling._fused_lora_forward for mod in layers)
    assert m.base_model.model.config.use_cache is False


def test_grouped_decode_step_is_repeat_kv_attention_without_the_copies():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sigil_exp.attention import sdpa_varlen_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, n, 16, generator=g) for h, n in ((8, 1), (2, 11), (2, 11)))
    mask = torch.ones(3, 1, 1, 11, dtype=torch.bool)
    mask[0, ..., :4] = mask[2, ..., :7] = False  # left padding of rows 0 and 2
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 4, True, False
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)  # transformers: K/V copied 4x
    out, _ = sdpa_varlen_attention(module, q, k, v, mask, scaling=0.25)
    assert out.shape == ref.shape == (3, 1, 8, 16) and torch.allclose(out, ref, atol=1e-6)


def test_sdpa_varlen_generates_left_padded_rows_as_sdpa_does(tiny_dir):
    mc = ModelConfig(name="t", name_or_path=str(tiny_dir))
    q = QuantConfig(method="none", compute_dtype="float32")
    ids = torch.tensor([[2, 2, 2, 7, 8, 9], [5, 6, 7, 8, 9, 10]])  # row 0 left-padded (pad id 2)
    mask = (ids != 2).long()
    outs = []
    for attn in ("sdpa", "sdpa_varlen"):
        m = modeling.load_base_model(mc, q, HardwareConfig(name="t", device="cpu", attn_implementation=attn),
                                     path=str(tiny_dir)).eval()
        with torch.no_grad():
            outs.append(m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=2,
                                   output_scores=True, return_dict_in_generate=True))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outs[0].scores, outs[1].scores, strict=True))


def test_sdpa_varlen_keeps_packed_documents_apart(tiny_dir):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    mc = ModelConfig(name="t", name_or_path=str(tiny_dir))
    q = QuantConfig(method="none", compute_dtype="float32")
    ref = modeling.load_base_model(mc, q, HardwareConfig(name="t", device="cpu"), path=str(tiny_dir)).eval()
    var = modeling.load_base_model(mc, q, HardwareConfig(name="t", device="cpu", attn_implementation="sdpa_varlen"),
                                   path=str(tiny_dir)).eval()
    for m in (ref, var):
        modeling.prepare_for_training(m, q, HardwareConfig(name="t", device="cpu", gradient_checkpointing=False))
        m.eval()
    col = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True)
    g = torch.Generator().manual_seed(0)
    for lens in ([16, 16, 16], [5, 17, 9, 1]):  # equal lengths: one batched call; mixed: one call per document
        docs = [torch.randint(3, 500, (n,), generator=g).tolist() for n in lens]
        b = {k: v for k, v in col([{"input_ids": x} for x in docs]).items() if k != "labels"}
        with torch.no_grad():
            sep = torch.cat([ref(input_ids=torch.tensor([x])).logits[0] for x in docs])
            assert torch.allclose(var(**b).logits[0], sep, atol=1e-5)
            # plain sdpa builds the block-diagonal mask from position ids: right only without a KV cache
            assert torch.allclose(ref(**b).logits[0], sep, atol=1e-5)
    ids = torch.randint(3, 500, (2, 12), generator=g)
    am = torch.ones_like(ids)
    am[0, :4] = 0  # left padding goes through sdpa's own mask
    with torch.no_grad():
        a, b2 = var(input_ids=ids, attention_mask=am).logits, ref(input_ids=ids, attention_mask=am).logits
    assert torch.allclose(a[am.bool()], b2[am.bool()], atol=1e-5)


def test_flop_count_of_llama_8b():
    f = flops_per_token(SHAPES["8b"], lora_params=41_943_040, seq=2048, checkpointing=True)
    assert f["N_matmul"] == pytest.approx(7.50e9, rel=0.01)
    assert f["model_flops_per_token"] == pytest.approx(4 * 7.50e9 + 6 * 41_943_040 + 3 * 2 * 32 * 4096 * 2049, rel=0.01)
    assert f["hardware_flops_per_token"] > f["model_flops_per_token"] * 1.4


def test_bench_tiny_runs_naive_and_a_preset_end_to_end(tmp_path, monkeypatch):
    from sigil_exp.bench import main

    monkeypatch.setenv("SIGIL_BENCH_WORK", str(tmp_path))
    out = tmp_path / "bench.json"
    report = main(["--tiny", "--presets", "h200", "--naive-batch", "2", "--steps", "1", "--warmup", "1",
                   "--loss-steps", "3", "--no-amp-naive", "--e2e", "", "--work-dir", str(tmp_path), "--out", str(out)])
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"naive_2x64", "naive_1x64", "h200_2x64"}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    h = rows["h200_2x64"]
    assert h["hardware"]["lora_fused"] and h["hardware"]["attn_implementation"] == "sdpa_varlen"
    assert h["speed"]["tokens_per_s"] > 0 and h["ratio_vs_naive_best"] > 0 and h["estimate"]["total_gb"] > 0
    assert h["loss_agreement"]["within_1pct"] and h["loss_agreement"]["adapter"]["delta_w_cosine"] > 0.9
    assert rows["naive_1x64"]["autocast"] is False and h["autocast"] is True
    assert json.loads(out.read_text())["targets"]["same_loss"]["met"]


@pytest.mark.slow
def test_bench_tiny_e2e_rows_run_the_real_entrypoint(tmp_path):
    """The end-to-end rows: `python -m sigil_exp` (and the plain trl script) as subprocesses on the two real
    data sets, steady tokens/s read back from each run's metrics.json into the report's "e2e" list."""
    from sigil_exp.bench import main

    out = tmp_path / "bench.json"
    report = main(["--tiny", "--e2e-only", "--e2e", "h200,naive,plain_trl", "--e2e-steps", "3", "--gen",
                   "--work-dir", str(tmp_path), "--out", str(out)])
    gen = {r["path"]: r for r in report["generation"]}
    assert set(gen) == {"old", "nf4_lora", "dense", "merged"}, report["generation"]
    assert all(r["new_tokens_per_s"] > 0 and r["batch"] >= 1 for r in gen.values())
    e2e = {(e["preset"], e["data"]): e for e in report["e2e"]}
    assert set(e2e) == {(p, d) for p in ("h200", "naive", "plain_trl") for d in ("bundled", "pipeline")}
    assert all(e["status"] == "ok" for e in e2e.values()), [e.get("error") for e in e2e.values()]
    assert all(e["steady_tokens_per_s"] > 0 and e["steady_steps"] == 1 for e in e2e.values())
    h = e2e[("h200", "bundled")]
    assert h["x_naive"] > 0 and h["x_plain_trl"] > 0 and "hardware=h200" in h["command"]
    assert json.loads(out.read_text())["e2e"] == report["e2e"]
    # the pipeline-shaped set: {prompt, gen} rows whose lengths spread over the whole range
    import statistics

    from transformers import AutoTokenizer

    rows = [json.loads(x) for x in (tmp_path / "pipeline_tiny.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(str(next(tmp_path.glob("model_*"))))
    lens = [len(tok(r["prompt"] + r["gen"])["input_ids"]) for r in rows]
    assert min(lens) < 100 and max(lens) > 200 and len(set(lens)) > 100 and statistics.median(lens) < 200
