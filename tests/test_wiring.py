"""The project's own wiring, end to end on the tiny model: phase 2 starts from the phase-1 adapter,
`lora.target_modules` decides where adapters go, `python -m sigil_exp.evaluate` applies the adapter,
and the Rust evaluation during training (`eval.every_steps`, `train.keep_best`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from sigil_exp import model as modeling
from sigil_exp.tracking import finish_run, init_run, read_offline_run
from sigil_exp.train import train
from tests.conftest import ROOT, smoke_cfg

needs_rustc = pytest.mark.skipif(shutil.which("rustc") is None, reason="rustc is not installed")


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


# ------------------------------------------------------------------------------------ phase 2
@pytest.fixture(scope="module")
def phase2(tiny_run, cache_dir, tmp_path_factory):
    """Phase 2 from the tiny run's adapter, on the same data, at a learning rate too small to move it."""
    run_dir = tmp_path_factory.mktemp("phase2")
    cfg = smoke_cfg(cache_dir, "phase=2", f"train.init_adapter={tiny_run['dir'] / 'adapter'}",
                    "train.lr=1e-6", "train.scheduler=constant", "train.warmup_ratio=0", "train.max_steps=2",
                    "train.save_steps=1", "train.logging_steps=1", "train.eval_steps=0", "eval.enabled=false")
    return {"cfg": cfg, "dir": run_dir, "metrics": train(cfg, run_dir)}


def test_phase2_starts_from_the_phase1_adapter(tiny_run, phase2):
    first = adapter_tensors(tiny_run["dir"] / "adapter")
    after_one_step = adapter_tensors(phase2["dir"] / "checkpoints" / "checkpoint-1")
    assert first.keys() == after_one_step.keys()
    lr = phase2["cfg"].train.lr
    worst = 0.0
    for k, w in first.items():
        # one Adam step moves a weight by at most ~lr; bf16 rounding of the loaded adapter (trl casts LoRA
        # weights of a quantised model to bf16 before sft_config's fp32 master copy) by 2^-8 relative
        slack = (after_one_step[k] - w).abs() - (2 * lr + w.abs() * 2 ** -8)
        worst = max(worst, float(slack.max()))
    assert worst <= 0, f"phase 2 step 1 is {worst} beyond one step from the phase-1 adapter"
    b = [k for k in first if "lora_B" in k]
    assert b and max(float(first[k].abs().max()) for k in b) > 100 * lr, "phase-1 lora_B is ~0: a fresh start would pass"


def test_phase2_first_loss_continues_phase1(tiny_run, phase2):
    """Same data and seed, so step 1 sees phase 1's first batch: a fresh adapter (B = 0) would give
    exactly phase 1's first loss; the phase-1 adapter gives a much lower one. The eval loss after two
    steps at lr 1e-6 is phase 1's final eval loss."""
    losses1 = [r["train/loss"] for r in tiny_run["metrics"]["history"] if "train/loss" in r]
    losses2 = [r["train/loss"] for r in phase2["metrics"]["history"] if "train/loss" in r]
    print(f"phase 1 losses {losses1[0]:.3f} -> {losses1[-1]:.3f}; phase 2 first loss {losses2[0]:.3f}; eval loss "
          f"{tiny_run['metrics']['eval/loss']:.4f} -> {phase2['metrics']['eval/loss']:.4f}")
    assert losses2[0] < losses1[0] - 0.5
    assert phase2["metrics"]["eval/loss"] == pytest.approx(tiny_run["metrics"]["eval/loss"], rel=2e-3)


# ------------------------------------------------------------------------- lora.target_modules
@pytest.mark.parametrize("preset, modules", [("attn", {"q_proj", "k_proj", "v_proj", "o_proj"}),
                                             ("mlp", {"gate_proj", "up_proj", "down_proj"})])
def test_lora_preset_decides_which_modules_get_adapters(cache_dir, preset, modules):
    cfg = smoke_cfg(cache_dir, f"lora={preset}")
    model = modeling.build_trainable_model(cfg.model, cfg.quant, cfg.lora, cfg.hardware, lora_seed=0)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    trainable = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == trainable == modules
    n_layers = cfg.model.build_tiny.num_hidden_layers
    assert sum(p.requires_grad for p in model.parameters()) == 2 * len(modules) * n_layers


# --------------------------------------------------------------- the evaluate CLI applies the adapter
def _as_cli_run(src, dst, cfg, zero_b: bool = False):
    """A run folder for `python -m sigil_exp.evaluate`: the adapter (lora_B zeroed: the base model's
    output exactly) and the resolved config."""
    shutil.copytree(src / "adapter", dst / "adapter")
    if zero_b:
        w = load_file(str(dst / "adapter" / "adapter_model.safetensors"))
        save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in w.items()},
                  str(dst / "adapter" / "adapter_model.safetensors"))
    OmegaConf.save(OmegaConf.structured(cfg), dst / "resolved_config.yaml")
    return dst


def _evaluate_cli(run, out, cache_dir) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "sigil_exp.evaluate", str(run), "--limit", "4", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SIGIL_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"metrics: {out / 'eval' / 'metrics.json'}" in proc.stdout  # the summary names where they are
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["eval/pass@1"] <= metrics["eval/compile_rate"] <= 1
    return [json.loads(line) for line in (out / "eval" / "completions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_completions(tiny_run, tmp_path_factory, cache_dir):
    """`python -m sigil_exp.evaluate` on the tiny run, and on a copy whose lora_B is zero (= the base)."""
    tmp, cfg = tmp_path_factory.mktemp("evaluate_cli"), tiny_run["cfg"]
    return {"trained": _evaluate_cli(_as_cli_run(tiny_run["dir"], tmp / "trained", cfg), tmp / "o1", cache_dir),
            "bare": _evaluate_cli(_as_cli_run(tiny_run["dir"], tmp / "zero", cfg, zero_b=True), tmp / "o2", cache_dir)}


@needs_rustc
def test_evaluate_cli_generates_with_the_trained_adapter(cli_completions):
    trained, bare = cli_completions["trained"], cli_completions["bare"]
    assert [c["task_id"] for c in trained] == [c["task_id"] for c in bare] and len(trained) == 4
    differ = sum(a["raw"] != b["raw"] for a, b in zip(trained, bare, strict=True))
    print(f"{differ}/4 completions differ between the trained adapter and lora_B = 0")
    assert differ >= 2, "the CLI's completions do not depend on the adapter's weights"


@needs_rustc
def test_generate_only_then_execute_elsewhere_gives_the_same_evaluation(cli_completions, tiny_run, tmp_path, cache_dir):
    """A GPU box without Rust: --generate-only writes the completions (and their speed) and stops;
    --completions executes that file on a machine with rustc."""
    run = _as_cli_run(tiny_run["dir"], tmp_path / "run", tiny_run["cfg"])
    env = {**os.environ, "SIGIL_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1"}
    (tmp_path / "gen" / "eval").mkdir(parents=True)
    (tmp_path / "gen" / "eval" / "metrics.json").write_text("{}")  # an earlier evaluation's, of other completions
    proc = subprocess.run([sys.executable, "-m", "sigil_exp.evaluate", str(run), "--limit", "4", "--generate-only",
                           "--out", str(tmp_path / "gen")], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eval_dir = tmp_path / "gen" / "eval"
    assert not (eval_dir / "metrics.json").exists() and "execute: python -m sigil_exp.evaluate --completions" in proc.stdout
    assert json.loads((eval_dir / "generation.json").read_text())["gen_tokens_per_s"] > 0
    generated = [json.loads(line) for line in (eval_dir / "completions.jsonl").read_text().splitlines()]
    assert [c["raw"] for c in generated] == [c["raw"] for c in cli_completions["trained"]]
    proc = subprocess.run([sys.executable, "-m", "sigil_exp.evaluate", "--completions", str(eval_dir / "completions.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((eval_dir / "results.jsonl").read_text().splitlines()) == 4
    assert "eval/pass@1" in json.loads((eval_dir / "metrics.json").read_text())["metrics"]


# ------------------------------------------------------------------ evaluation during training
@pytest.fixture(scope="module")
def run_with_eval_steps(cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval_steps")
    cfg = smoke_cfg(cache_dir, "train.max_steps=4", "train.save_steps=2", "train.logging_steps=1",
                    "train.eval_steps=0", "eval.enabled=false", "eval.every_steps=2", "eval.subset=2",
                    "eval.max_new_tokens=24", "train.keep_best=eval/pass@1",
                    "hardware.precision=fp32", "quant.compute_dtype=float32")  # fp32: ~3x faster on an AVX2 CPU
    run = init_run(cfg, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)), name="eval-steps", group=None,
                   tags=["test"])
    try:
        metrics = train(cfg, run_dir, run)
    finally:
        finish_run(run, failed=False)
    return {"cfg": cfg, "dir": run_dir, "metrics": metrics}


@needs_rustc
def test_eval_every_steps_logs_pass_rates_over_steps(run_with_eval_steps):
    d, metrics = run_with_eval_steps["dir"], run_with_eval_steps["metrics"]
    rows = [r for r in metrics["history"] if "eval/pass@1" in r]
    assert [r["train/global_step"] for r in rows] == [2, 4]
    for r in rows:
        results = [json.loads(line) for line in
                   (d / "eval" / "steps" / f"step-{r['train/global_step']}" / "results.jsonl").read_text().splitlines()]
        assert len(results) == 2 and {x["task_id"] for x in results} == {"SigilRust/0", "SigilRust/1"}
        assert r["eval/pass@1"] == sum(x["verdict"] == "pass" for x in results) / 2
        assert r["eval/compile_rate"] == sum(x["stage"] == "run" for x in results) / 2
    logged = read_offline_run(d)
    at = {h["_step"]: h for h in logged["history"] if "eval/pass@1" in h}
    assert sorted(at) == [2, 4]
    assert [at[s]["eval/compile_rate"] for s in (2, 4)] == [r["eval/compile_rate"] for r in rows]
    assert json.loads((d / "metrics.json").read_text())["history"] == json.loads(json.dumps(metrics["history"]))


@needs_rustc
def test_keep_best_keeps_the_best_steps_adapter(run_with_eval_steps):
    d, metrics = run_with_eval_steps["dir"], run_with_eval_steps["metrics"]
    rows = [r for r in metrics["history"] if "eval/pass@1" in r]
    best = max(r["eval/pass@1"] for r in rows)
    best_step = next(r["train/global_step"] for r in rows if r["eval/pass@1"] == best)  # the first to reach it
    assert metrics["best/step"] == best_step and metrics["best/eval/pass@1"] == best
    kept, last = adapter_tensors(d / "adapter"), adapter_tensors(d / "checkpoints" / "checkpoint-4")
    at_best = adapter_tensors(d / "checkpoints" / f"checkpoint-{best_step}")
    assert all(torch.equal(kept[k], at_best[k]) for k in kept)
    if best_step != 4:
        assert any(not torch.equal(kept[k], last[k]) for k in kept), "the last step's adapter stays in checkpoints/"
    assert read_offline_run(d)["summary"]["best/step"] == best_step


@pytest.mark.slow
def test_in_training_evaluation_does_not_change_training(cache_dir, tmp_path):
    """Generation seeds the global RNG (even greedy); the evaluation runs on its own RNG state, so the
    LoRA dropout masks, and with them the trained adapter, are the same with or without it."""
    common = ["train.max_steps=4", "train.save_steps=100", "train.logging_steps=1", "train.eval_steps=0",
              "eval.enabled=false", "eval.max_new_tokens=16", "hardware.precision=fp32", "quant.compute_dtype=float32"]
    assert smoke_cfg(cache_dir).lora.dropout > 0  # dropout draws from the RNG the generation reseeds
    train(smoke_cfg(cache_dir, *common), tmp_path / "plain")
    train(smoke_cfg(cache_dir, *common, "eval.every_steps=1", "eval.subset=1"), tmp_path / "evaluated")
    a, b = adapter_tensors(tmp_path / "plain" / "adapter"), adapter_tensors(tmp_path / "evaluated" / "adapter")
    assert (tmp_path / "evaluated" / "eval" / "steps" / "step-3" / "results.jsonl").is_file()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, key", [
    (["eval.every_steps=-1"], "eval.every_steps"),
    (["eval.subset=0"], "eval.subset"),
    (["eval.every_steps=5", "train.keep_best=eval/loss"], "train.keep_best"),
    (["train.keep_best=eval/pass@1"], "eval.every_steps"),
])
def test_in_training_eval_settings_fail_in_one_sentence(cache_dir, overrides, key):
    from sigil_exp.config import SigilError
    from sigil_exp.validation import validate

    with pytest.raises(SigilError) as e:
        validate(smoke_cfg(cache_dir, *overrides))
    assert key in str(e.value) and "\n" not in str(e.value)


def test_eval_subset_by_task_id(cache_dir):
    from sigil_exp.config import SigilError
    from sigil_exp.evaluate.during_training import select_problems

    picked = select_problems(smoke_cfg(cache_dir, "eval.subset=[SigilRust/8,SigilRust/0]"))
    assert [p.task_id for p in picked] == ["SigilRust/8", "SigilRust/0"]
    assert [p.task_id for p in select_problems(smoke_cfg(cache_dir, "eval.subset=3"))] == [
        "SigilRust/0", "SigilRust/1", "SigilRust/2"]
    assert len(select_problems(smoke_cfg(cache_dir))) == 8  # null: the final evaluation's problems (eval.limit)
    with pytest.raises(SigilError, match="eval.subset names SigilRust/999"):
        select_problems(smoke_cfg(cache_dir, "eval.subset=[SigilRust/999]"))
