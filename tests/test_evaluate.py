"""Evaluation: problems, brace stop, pass@k, batched vs naive execution, generation end to end.

Needs rustc (skipped without it). About 30 s on 2 cores; hostile samples and batched-vs-alone
verdicts live in test_evaluate_integrity.py, the sandbox and run limits in test_evaluate_sandbox.py.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from sigil_exp.config import EvalConfig, SigilError
from sigil_exp.evaluate import (
    execute_completions,
    generate_completions,
    read_completions,
    run_evaluation,
    write_completions,
)
from sigil_exp.evaluate.execute import ExecConfig, Sample, check_problems, execute, find_toolchain
from sigil_exp.evaluate.generate import GenConfig, extract_completion, make_stopping_criteria
from sigil_exp.evaluate.metrics import compute_metrics, pass_at_k
from sigil_exp.evaluate.problems import Problem, load_problems
from sigil_exp.evaluate.rust_lex import body_end, is_self_contained, truncate_body
from sigil_exp.evaluate.sandbox import detect_sandbox

BUNDLED = "pkg://assets/rust_problems.jsonl"
CATEGORIES = {"iterators", "ownership", "traits", "error_handling", "generics", "strings", "collections",
              "algorithms"}
needs_rustc = pytest.mark.skipif(shutil.which("rustc") is None and not Path("~/.cargo/bin/rustc").expanduser().exists(),
                                 reason="rustc is not installed")


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return load_problems(BUNDLED)


@pytest.fixture(scope="module")
def sandbox():
    return detect_sandbox("auto")


# ------------------------------------------------------------------------------ brace stop
@pytest.mark.parametrize("body, end", [
    ("    a + b\n}\nfn other() {}", "    a + b\n}"),
    ("    let s = \"}}}\";\n    s.len()\n}\n// after", "    let s = \"}}}\";\n    s.len()\n}"),
    ("    let c = '}';\n    if c == '{' { 1 } else { 2 }\n}\n", "    let c = '}';\n    if c == '{' { 1 } else { 2 }\n}"),
    ("    let e = '\\'';\n    0\n}", "    let e = '\\'';\n    0\n}"),
    ("    let r = r#\"a \"}\" b\"#;\n    0\n}", "    let r = r#\"a \"}\" b\"#;\n    0\n}"),
    ("    // closing } in a comment\n    /* } /* nested } */ } */\n    0\n}", None),
    ("    fn f<'a>(x: &'a str) -> &'a str { x }\n    'outer: loop { break 'outer; }\n    0\n}", None),
    ("    let b = b'}';\n    let bs = b\"}\";\n    0\n}", None),
])
def test_brace_stop_ignores_literals_and_comments(body, end):
    expected = end if end is not None else body
    assert truncate_body(body) == expected


def test_brace_stop_open_body_and_self_contained():
    assert body_end("    let x = vec![1, 2];\n    if x.is_empty() {\n") is None
    assert truncate_body("    \"unterminated }") == "    \"unterminated }"
    assert is_self_contained("fn f() { \"}\" ; }")
    assert not is_self_contained("fn f() { }}")
    assert not is_self_contained("fn f() { /* open ")


def test_extract_completion_chat_reply():
    reply = "Here you go:\n```rust\nfn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n```\nExplanation { }"
    assert extract_completion(reply, "chat", "add") == ("\n    a + b\n}", True)
    assert extract_completion("    a + b\n}\n\nfn main() {}", "completion", "add") == ("    a + b\n}", True)
    assert extract_completion("    a +", "completion", "add") == ("    a +", False)


def test_stopping_criteria_stops_each_row_at_its_closing_brace(tiny_model):
    import torch

    _, tok = tiny_model
    prompt = tok("fn f() -> i32 {\n", add_special_tokens=False)["input_ids"]
    done = prompt + tok("    if x { 1 } else { 2 }\n}", add_special_tokens=False)["input_ids"]
    open_ = prompt + tok("    if x { 1 }", add_special_tokens=False)["input_ids"]
    width = max(len(done), len(open_))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in (done, open_)])
    stop = make_stopping_criteria(tok, len(prompt), "completion", ["f", "f"])
    assert stop(ids[:, :len(done)], None).tolist() == [True, False]
    assert stop(ids[:, :len(open_)], None).tolist()[1] is False


# ------------------------------------------------------------------------------ pass@k
@pytest.mark.parametrize("n, c, k, expected", [
    (10, 3, 1, 0.3), (10, 3, 5, 1 - 21 / 252), (10, 0, 1, 0.0), (10, 10, 10, 1.0), (5, 1, 5, 1.0),
    (20, 2, 10, 1 - math.comb(18, 10) / math.comb(20, 10)), (1, 1, 1, 1.0),
])
def test_pass_at_k_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_metrics_names_and_rates():
    from sigil_exp.evaluate.execute import Result

    rs = [Result("a", "x", i, "", v, stage="run" if v != "compile_error" else "compile",
                 error_codes=["E0308"] if v == "compile_error" else [])
          for i, v in enumerate(["pass", "pass", "test_failure", "compile_error", "timeout"])]
    rs += [Result("b", "y", i, "", "compile_error", stage="compile", error_codes=["E0425", "E0308"]) for i in range(5)]
    rs[2].reason, rs[4].reason = "harness_bypassed", "test_timeout"
    rs.append(Result("c", "y", 0, "", "resource_limit", reason="memory", stage="run"))
    m = compute_metrics(rs)
    assert m["eval/rate/resource_limit"] == pytest.approx(1 / 11)
    assert (m["eval/failures/harness_bypassed"], m["eval/failures/memory"], m["eval/failures/test_timeout"]) == (1, 1, 1)
    rs.pop()
    m = compute_metrics(rs)
    assert m["eval/compile_rate"] == pytest.approx(0.4)
    assert m["eval/pass@1"] == pytest.approx(0.2)  # mean over problems of c/n: (2/5 + 0) / 2
    assert m["eval/pass@5"] == pytest.approx(0.5)
    assert "eval/pass@10" not in m  # n < 10
    assert m["eval/compile_rate/y"] == 0.0 and m["eval/pass@1/x"] == pytest.approx(0.4)
    assert m["eval/errors/E0308"] == 6 and m["eval/errors/E0425"] == 5


# ------------------------------------------------------------------------------ problems
def test_bundled_problem_set_shape(problems):
    assert len(problems) >= 45
    cats = Counter(p.category for p in problems)
    assert set(cats) == CATEGORIES and min(cats.values()) >= 5
    for p in problems:
        assert p.prompt.rstrip().endswith("{") and p.canonical_solution and p.test.startswith("#[cfg(test)]")
        assert p.test.count("assert") >= 3, p.task_id
        assert f"fn {p.entry_point}" in p.prompt


def test_malformed_problem_file_names_file_and_line(tmp_path):
    good = json.dumps({"task_id": "t/0", "prompt": "fn f() -> i32 {\n", "test": "#[test] fn t() {}",
                       "entry_point": "f"})
    f = tmp_path / "p.jsonl"
    f.write_text(good + "\n{not json\n")
    with pytest.raises(SigilError, match=r"p\.jsonl:2 is not a valid JSON object"):
        load_problems(f)
    f.write_text(good + "\n" + json.dumps({"task_id": "t/1", "prompt": "fn g() {\n"}) + "\n")
    with pytest.raises(SigilError, match=r"p\.jsonl:2 lacks test"):
        load_problems(f)
    with pytest.raises(SigilError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl")
    # MultiPL-E names load as they are; entry_point is derived from the prompt
    f.write_text(json.dumps({"name": "HumanEval_0", "prompt": "fn has_zero(v: Vec<i32>) -> bool {\n",
                             "tests": "}\n\nfn main() {\n    assert!(has_zero(vec![0]));\n}\n"}) + "\n")
    (p,) = load_problems(f)
    assert (p.task_id, p.entry_point, p.category) == ("HumanEval_0", "has_zero", "uncategorized")


def test_run_limit_keys_reach_the_executor():
    from omegaconf import OmegaConf

    from sigil_exp.evaluate import exec_config
    from tests.conftest import compose_cfg

    cfg = OmegaConf.to_object(compose_cfg("eval.run_mem_mb=2048", "eval.run_threads=64", "eval.run_output_mb=8",
                                          "eval.run_disk_mb=32", "eval.run_cpu_s=5", "eval.sandbox_allow_root=true"))
    ex = exec_config(cfg.eval)
    assert (ex.run_mem_mb, ex.run_threads, ex.run_output_mb, ex.run_disk_mb, ex.run_cpu_s, ex.allow_root) == \
        (2048, 64, 8, 32, 5.0, True)
    with pytest.raises(SigilError, match=r"eval\.run_threads=0 must be a positive integer"):
        exec_config(EvalConfig(run_threads=0))


def test_missing_rustc_is_one_sentence_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SigilError, match="rustc was not found.*install"):
        find_toolchain()


# ------------------------------------------------------------------------------ execution
@needs_rustc
def test_every_canonical_passes_and_wrong_bodies_fail(problems, sandbox):
    """The whole bundled set through the batched path: canonical pass, todo!() and `()` fail."""
    samples = []
    for p in problems:
        samples += [Sample.of(p, p.canonical_solution, 0), Sample.of(p, "    todo!()\n}\n", 1),
                    Sample.of(p, "    ()\n}\n", 2)]
    lines: list[str] = []
    results = execute(samples, ExecConfig(timeout_s=5), sandbox, progress=lines.append)
    # off a terminal: a few progress lines, then the total
    assert 2 <= len(lines) <= 6 and re.fullmatch(r"compile/test: \d+/186 samples, \d+ crates left", lines[0])
    assert re.fullmatch(r"compile/test: 186 samples in [\d.]+s \(\d+ rustc runs\)", lines[-1])
    by_kind = {k: [r for r in results if r.sample_idx == k] for k in range(3)}
    assert [r.task_id for r in by_kind[0] if r.verdict != "pass"] == []
    assert all((r.verdict, r.reason) == ("test_failure", "test_failed") for r in by_kind[1])
    assert all(r.verdict in ("compile_error", "test_failure") for r in by_kind[2])
    assert any("E0308" in r.error_codes for r in by_kind[2])
    assert {r.path for r in results} == {"batch"}


@needs_rustc
def test_check_problems_reports_a_broken_canonical(problems, sandbox):
    broken = Problem(task_id="broken/0", prompt=problems[0].prompt, test=problems[0].test,
                     entry_point=problems[0].entry_point, canonical_solution="    0\n}\n", category="x")
    failures = check_problems([problems[0], broken], ExecConfig(), sandbox)
    assert [f.task_id for f in failures] == ["broken/0"]
    assert "test_failure" in failures[0].reason


# ------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, problems):
    """A random 2-layer Llama and a byte-level BPE trained on the problem prompts, built here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([p.prompt + (p.canonical_solution or "") for p in problems], trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=specials[0], eos_token=specials[1],
                                  pad_token=specials[2])
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny_eval_model")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return model, tok


def test_completions_jsonl_round_trip(tmp_path, tiny_model, problems):
    model, tok = tiny_model
    comps = generate_completions(model, tok, problems[:2], GenConfig(n_samples=3, temperature=0.8, max_new_tokens=8,
                                                                       batch_size=4))
    assert [(c.task_id, c.sample_idx) for c in comps] == [(p.task_id, i) for p in problems[:2] for i in range(3)]
    write_completions(tmp_path / "c.jsonl", comps)
    assert read_completions(tmp_path / "c.jsonl") == comps
    (tmp_path / "bad.jsonl").write_text('{"task_id": "x"}\n')
    with pytest.raises(SigilError, match=r"bad\.jsonl:1 is not a completion record"):
        read_completions(tmp_path / "bad.jsonl")


def _evaluate_in_offline_wandb(cfg, model, tok, tmp_path):
    """run_evaluation inside an offline W&B run under tmp_path (read back with read_offline_run)."""
    import wandb

    run = wandb.init(mode="offline", dir=str(tmp_path), project="sigil-test",
                     settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
    try:
        return run_evaluation(cfg, model, tok, tmp_path)
    finally:
        run.finish()


@needs_rustc
def test_tiny_model_evaluation_end_to_end(tmp_path, tiny_model, problems):
    """Generate -> completions.jsonl -> execute -> results/metrics (+ W&B) on 3 problems, then
    re-execute the saved completions without the model. A random model scores ~0: that is fine."""
    from omegaconf import OmegaConf

    from sigil_exp.config import RunConfig
    from sigil_exp.tracking import read_offline_run
    from tests.conftest import compose_cfg

    model, tok = tiny_model
    tok.padding_side = "right"
    cfg: RunConfig = OmegaConf.to_object(compose_cfg("experiment=smoke"))
    cfg.eval = EvalConfig(enabled=True, limit=3, n_samples=2, temperature=0.7, max_new_tokens=24, batch_size=6,
                          timeout_s=5)
    metrics = _evaluate_in_offline_wandb(cfg, model, tok, tmp_path)
    assert tok.padding_side == "right"  # restored after left-padded generation
    ev = tmp_path / "eval"
    comps = [json.loads(line) for line in (ev / "completions.jsonl").read_text().splitlines()]
    results = [json.loads(line) for line in (ev / "results.jsonl").read_text().splitlines()]
    assert len(comps) == len(results) == 6
    assert {"task_id", "category", "completion", "verdict", "error_codes", "compile_s", "stderr"} <= set(results[0])
    assert metrics["eval/compile_rate"] == pytest.approx(sum(r["stage"] == "run" for r in results) / 6)
    per_task = Counter(r["task_id"] for r in results if r["verdict"] == "pass")
    assert metrics["eval/pass@1"] == pytest.approx(sum(per_task[c["task_id"]] / 2 for c in comps[::2]) / 3)
    assert "eval/pass@5" not in metrics and any(k.startswith("eval/pass@1/") for k in metrics)
    saved = json.loads((ev / "metrics.json").read_text())
    assert saved["metrics"] == metrics and saved["sandbox"]
    again = execute_completions(read_completions(ev / "completions.jsonl"), cfg.eval, tmp_path / "again")
    assert again["eval/compile_rate"] == metrics["eval/compile_rate"]
    logged = read_offline_run(next((tmp_path / "wandb").glob("offline-run-*")))["summary"]
    assert logged["eval/pass@1"] == metrics["eval/pass@1"]
    assert (logged["eval/samples/nrows"], logged["eval/samples/ncols"]) == (6, 5)


def test_generate_only_evaluation_writes_completions_and_logs_their_speed(tmp_path, tiny_model):
    """eval.generate_only=true (a training run on a GPU box without Rust): completions.jsonl and
    generation.json, an earlier evaluation's verdicts removed, the speed in W&B; no rustc asked for."""
    from omegaconf import OmegaConf

    from sigil_exp.config import RunConfig
    from sigil_exp.evaluate import check_eval_setup
    from sigil_exp.tracking import read_offline_run
    from tests.conftest import compose_cfg

    model, tok = tiny_model
    cfg: RunConfig = OmegaConf.to_object(compose_cfg("experiment=smoke", "eval.enabled=true", "eval.generate_only=true",
                                                     "eval.limit=2", "eval.max_new_tokens=8"))
    check_eval_setup(cfg)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.jsonl").write_text("{}\n")  # verdicts of other completions
    metrics = _evaluate_in_offline_wandb(cfg, model, tok, tmp_path)
    assert set(metrics) == {"eval/gen_tokens_per_s"} and metrics["eval/gen_tokens_per_s"] > 0
    ev = tmp_path / "eval"
    assert len((ev / "completions.jsonl").read_text().splitlines()) == 2 and not (ev / "results.jsonl").exists()
    assert json.loads((ev / "generation.json").read_text())["gen_tokens_per_s"] == metrics["eval/gen_tokens_per_s"]
    logged = read_offline_run(next((tmp_path / "wandb").glob("offline-run-*")))["summary"]
    assert logged["eval/gen_tokens_per_s"] == metrics["eval/gen_tokens_per_s"]
    cfg.eval.every_steps = 2
    with pytest.raises(SigilError, match="eval.every_steps scores checkpoints by running their Rust"):
        check_eval_setup(cfg)


@needs_rustc
def test_cli_on_an_adapter_folder_and_saved_completions(tmp_path, tiny_model, capsys):
    """`python -m sigil_exp.evaluate <run>/adapter` (config from ../resolved_config.yaml), then
    `--completions` re-executes without the model; a folder without a run is one clear error."""
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model

    from sigil_exp.evaluate.__main__ import main
    from tests.conftest import compose_cfg

    model, tok = tiny_model
    run = tmp_path / "run"
    model.save_pretrained(run / "base")
    tok.save_pretrained(run / "base")
    adapter = get_peft_model(LlamaFromDir(run / "base"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     task_type="CAUSAL_LM"))
    adapter.save_pretrained(run / "adapter")
    tok.save_pretrained(run / "adapter")
    cfg = compose_cfg("experiment=smoke", f"model.name_or_path={run / 'base'}", "model.build_tiny=null", "quant=none",
                      "eval.max_new_tokens=12")
    OmegaConf.save(cfg, run / "resolved_config.yaml", resolve=True)

    assert main([str(run / "adapter"), "--limit", "2", "--n-samples", "2", "--temperature", "0.9"]) == 0
    assert len((run / "eval" / "results.jsonl").read_text().splitlines()) == 4
    assert main(["--completions", str(run / "eval" / "completions.jsonl"), "--out", str(tmp_path / "re")]) == 0
    assert (tmp_path / "re" / "metrics.json").is_file()
    assert main([str(tmp_path / "re")]) == 2
    assert "holds neither adapter_config.json" in capsys.readouterr().err


def LlamaFromDir(path):  # noqa: N802 - reads like the class it loads
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path)


@needs_rustc
@pytest.mark.slow
def test_bench_fast_path_agrees_with_naive_on_226_samples(capsys):
    """`python -m sigil_exp.evaluate.bench`: identical verdicts, reasons and error codes, hostile
    samples included, and faster."""
    from sigil_exp.evaluate.bench import main as bench_main

    summary = bench_main(["--json", "--timeout-s", "2"])
    assert summary["samples"] == 226 and summary["verdict_agreement"] == "226/226"
    assert summary["fast_samples_per_min"] > summary["naive_samples_per_min"]
