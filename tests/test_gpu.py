"""CUDA checks of the fast path (skipped without a GPU): fused LoRA == peft's LoRA, packed
attention == separate documents, and one fused training step with Liger kernels."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

SHAPE = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=1000)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from sigil_exp.bench import build_random_model

    return build_random_model(SHAPE, tmp_path_factory.mktemp("gpu") / "model")


def _cfgs(model_dir, **hw):
    from sigil_exp.config import HardwareConfig, ModelConfig, QuantConfig

    mc = ModelConfig(name="t", name_or_path=str(model_dir))
    base = dict(name="t", device="cuda", precision="bf16", upcast_non_lora=False, gradient_checkpointing=False,
                attn_implementation="sdpa", liger_kernel=False)
    return mc, QuantConfig(method="nf4", compute_dtype=hw.pop("compute_dtype", "bfloat16")), HardwareConfig(**{**base, **hw})


def _lora_grads(model_dir, fused: bool, dropout: float, compute_dtype: str):
    from sigil_exp import model as modeling
    from sigil_exp.config import LoraConfig

    mc, q, hw = _cfgs(model_dir, compute_dtype=compute_dtype)
    torch.manual_seed(0)
    m = modeling.prepare_for_training(modeling.load_base_model(mc, q, hw, path=str(model_dir)), q, hw)
    torch.manual_seed(0)
    m = modeling.attach_lora(m, LoraConfig(dropout=dropout), fused=fused)
    with torch.no_grad():
        for i, (n, p) in enumerate(m.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator("cuda").manual_seed(i))
    m.train()
    ids = torch.randint(3, SHAPE["vocab"], (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    torch.manual_seed(5)
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_matches_peft_on_cuda(model_dir, dropout):
    l0, g0 = _lora_grads(model_dir, False, dropout, "float32")
    l1, g1 = _lora_grads(model_dir, True, dropout, "float32")
    assert abs(l0 - l1) < 1e-4 * abs(l0)
    worst = max(float((g0[k] - g1[k]).norm() / g0[k].norm().clamp_min(1e-12)) for k in g0)
    assert worst < 1e-3, worst  # same masks, same math; fp32 (tf32 off) up to summation order


def test_sdpa_varlen_matches_separate_documents_on_cuda(model_dir):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sigil_exp import model as modeling

    mc, q, hw = _cfgs(model_dir)
    ref = modeling.load_base_model(mc, q, hw, path=str(model_dir)).eval()
    ref.config.use_cache = False
    mc, q, hw = _cfgs(model_dir, attn_implementation="sdpa_varlen")
    var = modeling.load_base_model(mc, q, hw, path=str(model_dir)).eval()
    col = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True)
    g = torch.Generator().manual_seed(0)
    for lens in ([128, 128, 128], [33, 200, 71, 1]):
        docs = [torch.randint(3, SHAPE["vocab"], (n,), generator=g).tolist() for n in lens]
        b = {k: (v.cuda() if hasattr(v, "cuda") else v) for k, v in col([{"input_ids": x} for x in docs]).items()
             if k != "labels"}
        with torch.no_grad():
            out = var(**b).logits[0].float()
            sep = torch.cat([ref(input_ids=torch.tensor([x], device="cuda")).logits[0] for x in docs]).float()
        assert float((out - sep).abs().max()) < 0.05 * float(sep.abs().max()), lens


def test_fast_path_trains_one_step_with_liger(model_dir):
    pytest.importorskip("liger_kernel")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sigil_exp import model as modeling
    from sigil_exp.config import LoraConfig

    mc, q, hw = _cfgs(model_dir, attn_implementation="sdpa_varlen", liger_kernel=True, lora_fused=True)
    m = modeling.build_trainable_model(mc, q, LoraConfig(), hw, path=str(model_dir))
    col = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True)
    b = col([{"input_ids": list(range(3, 3 + n))} for n in (100, 60)])
    b = {k: (v.cuda() if hasattr(v, "cuda") else v) for k, v in b.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m(**b).loss
    loss.backward()
    grads = [p.grad for n, p in m.named_parameters() if "lora_A" in n]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_packed_steps_do_not_slow_down_with_distinct_document_lengths(tmp_path_factory):
    """Real packed batches hold documents of hundreds of distinct lengths. A backend that pays a cost per
    new shape (cuDNN SDPA builds a plan per sequence length) makes such steps several times slower than
    equal-length ones; the fast path must not care how many distinct lengths it has seen."""
    import time

    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sigil_exp import model as modeling
    from sigil_exp.bench import SHAPES, build_random_model
    from sigil_exp.config import LoraConfig

    small = build_random_model(SHAPES["small"], tmp_path_factory.mktemp("gpu_small") / "model")
    mc, q, hw = _cfgs(small, attn_implementation="sdpa_varlen", lora_fused=True)
    m = modeling.build_trainable_model(mc, q, LoraConfig(dropout=0.0), hw, path=str(small))
    m.train()
    col = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True)
    g = torch.Generator().manual_seed(0)
    vocab, tokens = SHAPES["small"]["vocab"], 8192

    def batch(lengths):
        b = col([{"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist()} for n in lengths])
        return {k: (v.cuda() if hasattr(v, "cuda") else v) for k, v in b.items()}

    def distinct_lengths(step):  # a fresh set of lengths every step, none seen before
        out, n = [], 0
        while n < tokens - 600:
            length = 37 + (step * 97 + len(out) * 31) % 500 + step
            out.append(length)
            n += length
        return [*out, tokens - n]

    def timed(batches):
        for b in batches[:2]:  # warm-up
            with torch.autocast("cuda", dtype=torch.bfloat16):
                m(**b).loss.backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches[2:]:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                m(**b).loss.backward()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / (len(batches) - 2)

    equal = timed([batch([256] * (tokens // 256)) for _ in range(8)])
    distinct = timed([batch(distinct_lengths(s)) for s in range(8)])
    assert len({n for s in range(8) for n in distinct_lengths(s)}) > 100
    assert distinct < 1.5 * equal, (distinct, equal)


def test_generation_stays_under_the_memory_cap(model_dir):
    """eval under hardware.gpu_memory_gb: the merge choice and the auto batch fit the cap, not the card."""
    from sigil_exp.evaluate.gen_bench import load_bench_model
    from sigil_exp.evaluate.generate import GenConfig, generate_tokens
    from sigil_exp.evaluate.problems import load_problems

    model, tok = load_bench_model(model_dir, None, "cuda")
    problems = load_problems("pkg://assets/rust_problems.jsonl", None)
    cap_gb = (torch.cuda.memory_allocated() + (1 << 30)) / 1e9  # 1 GiB above what the model holds
    torch.cuda.reset_peak_memory_stats()
    g = generate_tokens(model, tok, problems, GenConfig(n_samples=10, temperature=0.8, max_new_tokens=64,
                                                        ignore_stop=True, memory_gb=cap_gb))
    assert g.stats["rows"] == 10 * len(problems) and all(len(x) == 64 for x in g.ids)
    assert torch.cuda.max_memory_allocated() / 1e9 <= cap_gb, (torch.cuda.max_memory_allocated() / 1e9, cap_gb)
