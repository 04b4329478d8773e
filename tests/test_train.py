"""The real QLoRA stack on the tiny model: 4-bit NF4 base (bitsandbytes on CPU), LoRA, trl SFT."""

from __future__ import annotations

import json
import math

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from sigil_exp import model as modeling
from sigil_exp.tracking import read_offline_run
from tests.conftest import smoke_cfg


def test_loss_is_finite_and_falls(tiny_run):
    losses = [r["train/loss"] for r in tiny_run["metrics"]["history"] if "train/loss" in r]
    assert len(losses) >= 8 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.5, f"loss did not fall: {losses}"
    m = tiny_run["metrics"]
    assert math.isfinite(m["eval/loss"]) and m["eval/loss"] < losses[0]
    assert m["train/steps"] == 30 and m["train/tokens_per_s"] > 0 and m["sys/peak_mem_gb"] > 0


def test_run_folder_holds_adapter_metrics_and_wandb(tiny_run):
    d = tiny_run["dir"]
    assert (d / "adapter" / "adapter_config.json").is_file()
    assert (d / "adapter" / "tokenizer_config.json").is_file()
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["params/trainable"] < metrics["params/total"]
    assert sorted(p.name for p in (d / "checkpoints").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-15", "checkpoint-30"]
    assert list(d.glob("wandb/offline-run-*/run-*.wandb"))


def test_wandb_offline_run_reads_back(tiny_run):
    run = read_offline_run(tiny_run["dir"])
    cfg = tiny_run["cfg"]
    assert run["run"]["name"] == "test-run" and run["run"]["group"] == "tests"
    assert run["config"]["lora.r"] == cfg.lora.r and run["config"]["model.name"] == "tiny"
    assert run["config"]["quant.method"] == "nf4" and run["config"]["train.max_steps"] == 30
    logged = [(r["train/global_step"], r["train/loss"]) for r in run["history"] if "train/loss" in r]
    expected = [(r["train/global_step"], r["train/loss"]) for r in tiny_run["metrics"]["history"] if "train/loss" in r]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected])
    assert any("eval/loss" in r for r in run["history"])
    evals = [(r["train/global_step"], r["eval/loss"]) for r in tiny_run["metrics"]["history"] if "eval/loss" in r]
    assert [s for s, _ in evals] == [15, 30]  # the trainer's evaluation at step 30 is the final one, not repeated
    assert tiny_run["metrics"]["eval/loss"] == evals[-1][1]
    assert {"train/learning_rate", "train/grad_norm", "train/window_tokens_per_s", "sys/peak_mem_gb"} <= set(run["history"][-3])
    assert run["summary"]["params/trainable"] == tiny_run["metrics"]["params/trainable"]
    # one speed figure: the steady state (warm-up steps excluded) in metrics.json and in the W&B summary
    m = tiny_run["metrics"]
    assert m["train/warmup_steps_excluded"] == 2 and m["train/steady_steps"] == 28
    assert run["summary"]["train/tokens_per_s"] == pytest.approx(m["train/tokens_per_s"])
    assert run["summary"]["status"] == "ok" and run["exit_code"] == 0


def test_saved_adapter_holds_only_lora_weights(tiny_run):
    weights = load_file(str(tiny_run["dir"] / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert any(float(w.abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k), "lora_B never trained"


def _tiny_lora_model(cfg):
    base = modeling.load_base_model(cfg.model, cfg.quant, cfg.hardware)
    base = modeling.prepare_for_training(base, cfg.quant, cfg.hardware)
    return modeling.attach_lora(base, cfg.lora)


def test_base_is_4bit_and_only_lora_trains(cache_dir):
    cfg = smoke_cfg(cache_dir)
    model = _tiny_lora_model(cfg)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(linears) == 7 * cfg.model.build_tiny.num_hidden_layers
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4" for m in linears.values())
    assert all(m.weight.quant_state.nested for m in linears.values()), "double quantisation is off"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(linears)


def test_adapter_reloads_to_the_same_logits(cache_dir, tmp_path):
    from peft import PeftModel

    cfg = smoke_cfg(cache_dir)
    torch.manual_seed(0)
    model = _tiny_lora_model(cfg)
    ids = torch.randint(0, 500, (2, 24))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # make lora_B non-zero so the adapter changes the output
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits.float()
    assert not torch.allclose(before, base_logits, atol=1e-3), "adapter has no effect; the test would prove nothing"
    model.save_pretrained(tmp_path / "adapter")

    # A freshly quantised base, prepared exactly as for training (fp32 norms/embeddings/lm_head).
    fresh = modeling.prepare_for_training(modeling.load_base_model(cfg.model, cfg.quant, cfg.hardware), cfg.quant,
                                          cfg.hardware)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits.float()
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
