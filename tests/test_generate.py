"""Evaluation generation's fast path (own decode loop, sorted batches, shared prefill, finished rows
dropped, in-place KV cache, dense copy with the adapter beside it, merged copy) against the old path (transformers generate, 4-bit + LoRA, batches of 8), the
generation benchmark's code path, and the `python -m sigil_exp.generate` CLI. The adapter is the
tiny model trained by the real CLI on two bundled problems (tests/trained_run.py)."""

from __future__ import annotations

import json

import pytest
from conftest import compose_cfg

from sigil_exp.artifacts import find_artifact, load_for_generation, load_run_config
from sigil_exp.config import EvalConfig, SigilError, to_object
from sigil_exp.evaluate import gen_config
from sigil_exp.evaluate.generate import GenConfig, generate_completions, generate_tokens, generation_model
from sigil_exp.evaluate.problems import load_problems
from tests.trained_run import N_PROBLEMS, trained_run

BUNDLED = "pkg://assets/rust_problems.jsonl"


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    return trained_run(tmp_path_factory.getbasetemp(), cache_dir)


@pytest.fixture(scope="module")
def trained(run):
    art = find_artifact(run)
    return load_for_generation(art, load_run_config(art.config))


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    total = sum(max(len(x), len(y)) for x, y in zip(a, b, strict=True))
    return sum(p == q for x, y in zip(a, b, strict=True) for p, q in zip(x, y, strict=False)) / max(total, 1)


def test_fast_path_greedy_completions_equal_the_old_path(trained, capsys):
    """Default settings (CPU: the 4-bit + LoRA model itself, every row in one sorted batch, rows
    dropped as they finish) and the dense copy (the dequantised weights in the compute dtype, the
    adapter beside them) give the old path's completions exactly; the merged copy gives them on the
    problems the adapter learned (elsewhere the rounding of W + s*B@A may flip a near-tie)."""
    model, tok = trained
    problems = load_problems(BUNDLED, 8)
    old = generate_tokens(model, tok, problems, GenConfig(engine="hf", batch_size=8, weights="trained", max_new_tokens=48))
    fast = generate_tokens(model, tok, problems, gen_config(EvalConfig(max_new_tokens=48), "completion"))
    dense = generate_tokens(model, tok, problems, GenConfig(weights="dense", max_new_tokens=48))
    merged = generate_tokens(model, tok, problems, GenConfig(weights="merged", max_new_tokens=48))
    paths = [("old", old), ("fast", fast), ("dense", dense), ("merged", merged)]
    by_row = {name: dict(zip(g.rows, g.ids, strict=True)) for name, g in paths}
    keys = sorted(by_row["old"])
    assert [g.stats["model"] for _, g in paths] == ["trained", "trained", "dense", "merged"]
    assert fast.stats["batch"] == 8 and fast.stats["waves"] == 1 and old.stats["waves"] == 1
    assert [by_row["fast"][k] for k in keys] == [by_row["old"][k] for k in keys]
    assert [by_row["dense"][k] for k in keys] == [by_row["old"][k] for k in keys]
    learned = [k for k in keys if k[0] < N_PROBLEMS]
    assert [by_row["merged"][k] for k in learned] == [by_row["old"][k] for k in learned]
    with capsys.disabled():
        print("\n[generate] greedy token agreement with the old path on 8 problems: " + ", ".join(
            f"{name} {_agreement([by_row[name][k] for k in keys], [by_row['old'][k] for k in keys]):.4f}"
            for name in ("fast", "dense", "merged")))
    texts = generate_completions(model, tok, problems[:2], GenConfig(max_new_tokens=48))
    assert [c.completion for c in texts] == [p.canonical_solution.rstrip("\n") for p in problems[:2]]


def test_samples_share_their_prompt_and_batches_are_capped(trained):
    """Sampled: n rows per problem from one prefill each, reproducible by seed; a batch cap splits
    the sorted rows into waves without changing what greedy decoding writes."""
    model, tok = trained
    problems = load_problems(BUNDLED, 3)
    cfg = GenConfig(n_samples=4, temperature=1.0, top_p=0.9, max_new_tokens=16, seed=3)
    a, b = generate_tokens(model, tok, problems, cfg), generate_tokens(model, tok, problems, cfg)
    assert a.ids == b.ids and a.stats["rows"] == 12 and a.stats["waves"] == 1
    assert sorted(a.rows) == [(p, s) for p in range(3) for s in range(4)]
    assert len({tuple(ids) for (p, _), ids in zip(a.rows, a.ids, strict=True) if p == 2}) > 1  # samples differ
    comps = generate_completions(model, tok, problems, cfg)
    assert [(c.task_id, c.sample_idx) for c in comps] == [(p.task_id, s) for p in problems for s in range(4)]
    greedy = GenConfig(max_new_tokens=24)
    whole = generate_tokens(model, tok, problems, greedy)
    waves = generate_tokens(model, tok, problems, GenConfig(max_new_tokens=24, batch_size=2))
    assert waves.stats["waves"] == 2 and waves.ids == whole.ids and waves.rows == whole.rows


def test_weights_choice_and_eval_keys(trained):
    """auto keeps the trained model on the CPU; the dense copy holds the dequantised weights with each
    adapter beside its layer and computes the trained model's logits; the merged copy holds no adapter."""
    import torch

    from sigil_exp.merge import LoraBeside

    model, tok = trained
    assert generation_model(model, "auto")[1] == "trained"  # auto on the CPU: the trained model itself
    ids = torch.tensor([tok("fn add(a: i32, b: i32) -> i32 {")["input_ids"]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        for weights in ("dense", "merged"):
            copy, how, _ = generation_model(model, weights)
            beside = [m for m in copy.modules() if isinstance(m, LoraBeside)]
            assert how == weights and not hasattr(copy, "peft_config")
            assert len(beside) == (7 * copy.config.num_hidden_layers if weights == "dense" else 0)
            torch.testing.assert_close(copy(input_ids=ids).logits, want, atol=2e-4, rtol=1e-4)
    assert gen_config(EvalConfig(batch_size=64, weights="trained", compile=True), "completion") == GenConfig(
        batch_size=64, weights="trained", engine="static", max_new_tokens=512)
    from sigil_exp.preflight import allocation_cap_gb

    hw = to_object(compose_cfg("hardware=consumer_24gb")).hardware
    assert gen_config(EvalConfig(), "completion", allocation_cap_gb(hw)).memory_gb == pytest.approx(24 * 0.92 - 0.6)
    assert allocation_cap_gb(to_object(compose_cfg("hardware=cpu")).hardware) is None
    with pytest.raises(SigilError, match="eval.batch_size='big' must be auto or a positive integer"):
        gen_config(EvalConfig(batch_size="big"), "completion")
    with pytest.raises(SigilError, match="eval.weights='maybe' must be one of auto, trained, dense, merged"):
        gen_config(EvalConfig(weights="maybe"), "completion")


def test_static_cache_engine_runs(trained):
    """eval.compile=true: transformers generate with a static KV cache (compiled on CUDA only)."""
    model, tok = trained
    g = generate_tokens(model, tok, load_problems(BUNDLED, 2), GenConfig(engine="static", max_new_tokens=24))
    assert g.stats["engine"] == "static" and [len(x) for x in g.ids] == [len(x) for x in generate_tokens(
        model, tok, load_problems(BUNDLED, 2), GenConfig(max_new_tokens=24)).ids]


def test_gen_bench_tiny_compares_the_paths(tmp_path):
    """`python -m sigil_exp.evaluate.gen_bench --tiny`: every path on a random tiny model, rows run to
    max_new_tokens (--ignore-stop), tokens/s and greedy agreement reported."""
    from sigil_exp.evaluate.gen_bench import main

    report = main(["--tiny", "--out", str(tmp_path / "gen.json")])
    rows = {r["path"]: r for r in report["rows"]}
    assert set(rows) == {"old", "nf4_lora", "dense", "merged"} and json.loads((tmp_path / "gen.json").read_text())["rows"]
    for r in rows.values():
        assert r["new_tokens"] == r["rows"] * report["max_new_tokens"] and r["new_tokens_per_s"] > 0
        assert 0.0 <= r["token_agreement"] <= 1.0
    assert rows["old"]["token_agreement"] == 1.0 and rows["nf4_lora"]["token_agreement"] == 1.0
    assert rows["old"]["batch"] == 6 and rows["merged"]["model"] == "merged" and rows["dense"]["model"] == "dense"
    assert rows["old"]["teacher_forced_agreement"] == 1.0 and rows["old"]["forced_positions"] == 2 * 8
    assert rows["dense"]["teacher_forced_agreement"] == 1.0  # the trained model's top token at every position


@pytest.mark.parametrize("what", ["run", "export"])
def test_generate_cli_streams_in_the_training_format(what, run, tmp_path, capsys):
    from sigil_exp.export import main as export_main
    from sigil_exp.generate import main

    path = run
    if what == "export":
        path = tmp_path / "exp"
        assert export_main([str(run), "--out", str(path)]) == 0
        capsys.readouterr()
    p = load_problems(BUNDLED, 1)[0]
    assert main([str(path), "--prompt", p.prompt, "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out.strip() == p.canonical_solution.strip()  # stops at the closing brace
    assert main([str(path), "--problems", BUNDLED, "--limit", "2", "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert out.count("### SigilRust/") == 2 and p.prompt + p.canonical_solution in out


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_paths_auto_dense_copy_and_speed(tmp_path):
    """On CUDA: auto builds the dense copy when it fits, and every path runs on a small random Llama;
    the dense path is faster than the old one."""
    from sigil_exp.evaluate.gen_bench import load_bench_model, main

    report = main(["--model", str(tmp_path / "m"), "--shape", "small", "--ignore-stop", "--n-samples", "4",
                   "--limit", "16", "--max-new-tokens", "64", "--paths", "old,nf4_lora,dense,merged,static", "--device", "cuda"])
    rows = {r["path"]: r for r in report["rows"]}
    assert rows["dense"]["model"] == "dense" and all(r["peak_gb"] for r in rows.values())
    assert rows["dense"]["new_tokens_per_s"] > rows["old"]["new_tokens_per_s"]
    model, _ = load_bench_model(tmp_path / "m", None, "cuda")
    assert generation_model(model, "auto")[1] == "dense"
