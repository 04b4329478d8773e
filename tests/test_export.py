"""Export: merge (LoRA, rsLoRA, DoRA) into the run's base, standalone checkpoint, model card,
push/GGUF code paths, and the one-sentence failures on damaged folders (shared with evaluate and
generate). The tiny model is trained by the real CLI (tests/trained_run.py) so the adapter matters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sigil_exp.artifacts import find_artifact, load_for_generation, load_run_config
from sigil_exp.config import SigilError
from sigil_exp.export import export, main, push_to_hub, to_gguf
from sigil_exp.merge import full_precision_copy, lora_deltas, merge_into
from sigil_exp.model import load_base_model, peft_config, resolve_model_path
from tests.trained_run import trained_run

ROOT = Path(__file__).resolve().parents[1]
needs_rustc = pytest.mark.skipif(shutil.which("rustc") is None, reason="rustc is not installed")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir) -> Path:
    return trained_run(tmp_path_factory.getbasetemp(), cache_dir)


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    art = find_artifact(run)
    cfg = load_run_config(art.config)
    return {mb: export(art, cfg, out / mb, merge_base=mb, max_shard_size="300KB") for mb in ("nf4_roundtrip", "original")}


def _texts(tokenizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prompt + canonical solution of the two trained problems and two others, encoded as in
    training; and, per text, the positions that predict a solution token of a trained problem."""
    from sigil_exp.data.format import encode_prompt
    from sigil_exp.evaluate.problems import load_problems

    seqs, learned = [], []
    for i, p in enumerate(load_problems("pkg://assets/rust_problems.jsonl", 4)):
        prompt = encode_prompt(p.prompt, "completion", tokenizer)
        ids = prompt + tokenizer(p.canonical_solution, add_special_tokens=False)["input_ids"]
        seqs.append(torch.tensor([ids]))
        learned.append(torch.arange(len(ids)) >= len(prompt) - 1 if i < 2 else torch.zeros(len(ids), dtype=torch.bool))
    return seqs, learned


def _logits(model, seqs) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(input_ids=s).logits[0].float() for s in seqs])


def _compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |got - ref| / max |ref|, share of positions with the same argmax)."""
    return ((got - ref).abs().max() / ref.abs().max()).item(), (got.argmax(-1) == ref.argmax(-1)).float().mean().item()


def _bf16_floor(trained, ref: torch.Tensor, exact: torch.Tensor, seqs) -> tuple[float, float]:
    """What bf16 rounding alone costs on these weights: bf16 vs float32 arithmetic (the run computed
    in bf16), or a bf16 copy of the merged weights vs float32 (the run computed in float32, as the CPU
    preset does on CPUs without native bf16); the larger gap."""
    r1, a1 = _compare(ref, exact)
    r2, a2 = _compare(_logits(full_precision_copy(trained, torch.bfloat16, merge=True), seqs), exact)
    return max(r1, r2), min(a1, a2)


def test_nf4_roundtrip_export_computes_what_training_saw(run, exports, capsys):
    """The nf4_roundtrip export's logits equal base(4-bit) + adapter within bf16 rounding (the
    same gap as bf16 vs float32 arithmetic on identical weights); the original base is further off.
    Its weights are bit-for-bit the merged copy evaluation builds from the live 4-bit model."""
    from transformers import AutoModelForCausalLM

    art = find_artifact(run)
    cfg = load_run_config(art.config)
    trained, tok = load_for_generation(art, cfg)  # what training saw: 4-bit base + peft adapter
    seqs, learned = _texts(tok)
    learned = torch.cat(learned)
    ref = _logits(trained, seqs)
    exact = _logits(full_precision_copy(trained, torch.float32, merge=True), seqs)  # the same weights in float32 arithmetic
    nf4 = AutoModelForCausalLM.from_pretrained(exports["nf4_roundtrip"])
    orig = AutoModelForCausalLM.from_pretrained(exports["original"])
    got_nf4 = _logits(nf4, seqs)
    r_nf4, a_nf4 = _compare(got_nf4, ref)
    r_orig, a_orig = _compare(_logits(orig, seqs), ref)
    r_bf16, a_bf16 = _bf16_floor(trained, ref, exact, seqs)
    _, a_learned = _compare(got_nf4[learned], ref[learned])  # where the adapter learned the solutions
    with capsys.disabled():
        print(f"\n[export] vs 4-bit+adapter over {ref.shape[0]} positions: nf4_roundtrip max rel diff {r_nf4:.4f}, "
              f"argmax agreement {a_nf4:.4f} ({a_learned:.4f} on the learned problems); original {r_orig:.4f} / "
              f"{a_orig:.4f}; bf16 vs float32 arithmetic on the same weights {r_bf16:.4f} / {a_bf16:.4f}")
    assert r_nf4 <= 2 * r_bf16 and a_nf4 >= min(0.95, a_bf16 - 0.02) and a_learned >= 0.99
    assert r_orig > 3 * r_nf4
    merged = full_precision_copy(trained, merge=True)
    for name, p in nf4.named_parameters():
        assert torch.equal(p, merged.get_parameter(name)), name


def test_export_is_a_standalone_transformers_checkpoint(exports):
    """Load with plain transformers in a fresh interpreter (no peft, no sigil_exp) and generate."""
    folder = exports["nf4_roundtrip"]
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*.safetensors"))) > 1
    meta = json.loads((folder / "sigil_export.json").read_text())
    assert meta["merge_base"] == "nf4_roundtrip" and meta["merged_layers"] == meta["roundtripped_layers"] == 14
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"d = {str(folder)!r}\n"
        "tok = AutoTokenizer.from_pretrained(d); model = AutoModelForCausalLM.from_pretrained(d)\n"
        "p = '/// Returns the sum of the squares of the odd numbers in `v`.\\n'\n"
        "p += '/// Negative odd numbers count too: sum_of_odd_squares(&[1, 2, -3]) == 10.\\n'\n"
        "p += 'fn sum_of_odd_squares(v: &[i64]) -> i64 {\\n'\n"
        "ids = torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False).input_ids])\n"
        "out = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)\n"
        "print(json.dumps({'text': tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True),\n"
        "  'chat': bool(tok.chat_template), 'eos': model.generation_config.eos_token_id,\n"
        "  'foreign': sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'sigil_exp', 'bitsandbytes'))}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["foreign"] == [] and got["chat"] and len(got["eos"]) == 2
    assert got["text"].startswith("    v.iter().filter(|x| *x % 2 != 0)")  # the trained solution, from the merged model


def test_model_card_is_written_from_the_run_folder(run, tmp_path):
    """Base model, LoRA/quant/data config, data stats, training figures, eval results, the reproduce command."""
    from sigil_exp.evaluate import execute_completions
    from sigil_exp.evaluate.generate import Completion
    from sigil_exp.evaluate.problems import load_problems

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export-*"))
    if shutil.which("rustc"):  # eval results as a real evaluation writes them
        cfg = load_run_config(copy / "resolved_config.yaml")
        comps = [Completion(p.task_id, p.category, 0, p.prompt, p.test, p.entry_point, p.canonical_solution, "", True, 1)
                 for p in load_problems("pkg://assets/rust_problems.jsonl", 2)]
        execute_completions(comps, cfg.eval, copy / "eval")
    assert main([str(copy), "--out", str(tmp_path / "exp")]) == 0
    card = (tmp_path / "exp" / "README.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    stats = json.loads((run / "data_stats.json").read_text())["stats"]
    compute = load_run_config(run / "resolved_config.yaml").quant.compute_dtype  # bfloat16, or float32 on CPUs without bf16
    for needle in ["library_name: transformers", "tiny-llama", "| r / alpha / dropout | 16 / 16 / 0.0 |",
                   f"nf4, double quant True, compute {compute}", "jsonl:", f"| steps | {metrics['train/steps']} |",
                   f"{metrics['train/loss']:,.4g}", f"{stats['train_tokens']:,}", "python -m sigil_exp experiment=smoke data=jsonl",
                   "train.max_steps=16", f"python -m sigil_exp.export {copy} --out {tmp_path / 'exp'}"]:
        assert needle in card, needle
    if shutil.which("rustc"):
        assert "| eval/pass@1 | 1 |" in card and "| eval/compile_rate | 1 |" in card


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_lora_rslora_and_dora_adapters_merge(variant, run, tmp_path):
    """A non-zero adapter of each kind, saved as a run's adapter: the export matches 4-bit base + adapter,
    and (quant none) our merge equals peft's own merge_and_unload."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = load_run_config(run / "resolved_config.yaml")
    cfg.lora.use_rslora, cfg.lora.use_dora, cfg.lora.r, cfg.lora.alpha = variant == "rslora", variant == "dora", 4, 8.0
    fake = tmp_path / "run"
    shutil.copytree(run, fake, ignore=shutil.ignore_patterns("adapter", "export-*", "checkpoints"))
    base = load_base_model(cfg.model, cfg.quant, cfg.hardware)
    torch.manual_seed(0)
    peft = get_peft_model(base, peft_config(cfg.lora))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
        if "magnitude" in name:
            p.data.mul_(1 + 0.2 * torch.rand_like(p))
    peft.save_pretrained(fake / "adapter")
    seqs = [torch.randint(6, 1000, (1, 48), generator=torch.Generator().manual_seed(1))]
    art = find_artifact(fake)
    trained, _ = load_for_generation(art, cfg)
    ref = _logits(trained, seqs)
    r_bf16, a_bf16 = _bf16_floor(trained, ref, _logits(full_precision_copy(trained, torch.float32, merge=True), seqs), seqs)  # rounding alone
    folder = export(art, cfg, tmp_path / "exp")
    rel, agree = _compare(_logits(AutoModelForCausalLM.from_pretrained(folder), seqs), ref)
    assert rel <= 2 * r_bf16 and agree >= a_bf16 - 0.05, (variant, rel, agree, r_bf16, a_bf16)
    # the merge arithmetic itself, against peft's, on a full-precision base
    path = resolve_model_path(cfg.model)
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = load_file(str(fake / "adapter" / "adapter_model.safetensors"))
    merge_into(ours, lora_deltas(state, json.loads((fake / "adapter" / "adapter_config.json").read_text()), "t"), None,
               torch.float32)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                       str(fake / "adapter")).merge_and_unload()
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(ours.get_parameter(name), p, rtol=1e-5, atol=1e-6)


def test_adapters_that_cannot_be_merged_are_refused():
    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    state = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b}
    with pytest.raises(SigilError, match="init_lora_weights='pissa'.*rewrites the base"):
        lora_deltas(state, {"peft_type": "LORA", "init_lora_weights": "pissa"}, "x")
    with pytest.raises(SigilError, match="modules_to_save"):
        lora_deltas(state, {"modules_to_save": ["lm_head"]}, "x")
    with pytest.raises(SigilError, match="is a PREFIX_TUNING adapter"):
        lora_deltas(state, {"peft_type": "PREFIX_TUNING"}, "x")
    with pytest.raises(SigilError, match="embed_tokens.lora_embedding_A.*cannot be merged"):
        lora_deltas({**state, "base_model.model.model.embed_tokens.lora_embedding_A": a}, {}, "x")
    d = lora_deltas(state, {"lora_alpha": 16, "use_rslora": True, "alpha_pattern": {"q_proj": 4}}, "x")
    assert d["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(4 / 2 ** 0.5)


@pytest.mark.parametrize("cli", ["export", "evaluate", "generate"])
def test_damaged_folders_end_in_one_sentence_naming_the_file(cli, run, tmp_path, capsys):
    """Truncated or missing adapter weights, a folder that is not a run, a cut-off export shard."""
    from sigil_exp.evaluate.__main__ import main as evaluate_main
    from sigil_exp.generate import main as generate_main

    entry = {"export": main, "evaluate": evaluate_main, "generate": generate_main}[cli]
    extra = ["--prompt", "fn f() {"] if cli == "generate" else []
    bad = tmp_path / "bad"
    shutil.copytree(run, bad, ignore=shutil.ignore_patterns("export-*", "checkpoints"))
    (tmp_path / "empty").mkdir()
    weights = bad / "adapter" / "adapter_model.safetensors"

    def fails(path: Path, message: str) -> None:
        assert entry([str(path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0 and "Traceback" not in err, err

    weights.write_bytes(weights.read_bytes()[:5000])
    fails(bad, f"{weights} is truncated")
    fails(bad / "adapter", f"{weights} is truncated")
    weights.write_bytes(b"\x00" * 4)
    fails(bad, f"{weights} is damaged or truncated")
    weights.unlink()
    fails(bad, f"{weights} is missing")
    fails(tmp_path / "empty", "holds neither adapter_config.json")
    fails(tmp_path / "nowhere", "is not a folder")


def test_damaged_export_shard_is_named(exports, tmp_path, capsys):
    from sigil_exp.evaluate.__main__ import main as evaluate_main

    bad = tmp_path / "exp"
    shutil.copytree(exports["nf4_roundtrip"], bad)
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert evaluate_main([str(bad)]) == 2
    assert f"{shard} is truncated" in capsys.readouterr().err


class LocalHub:
    """Stands in for the Hub's HTTP API (unreachable from tests): a folder per repo and branch."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def create_repo(self, repo, private=False, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo, private))
        (self.root / repo).mkdir(parents=True, exist_ok=exist_ok)
        return f"local://{repo}"

    def create_branch(self, repo, branch, exist_ok=False, repo_type=None):
        self.calls.append(("create_branch", repo, branch))

    def upload_folder(self, repo_id, folder_path, revision=None, repo_type=None, commit_message="", ignore_patterns=()):
        self.calls.append(("upload_folder", repo_id, revision, commit_message))
        shutil.copytree(folder_path, self.root / repo_id / (revision or "main"), ignore=shutil.ignore_patterns(*ignore_patterns))


def test_push_to_hub_code_path_offline_and_unreachable(exports, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    folder = exports["nf4_roundtrip"]
    hub = LocalHub(tmp_path / "hub")
    assert push_to_hub(folder, "me/tiny-rust", private=True, revision="v1", api=hub) == "local://me/tiny-rust"
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_folder"] and hub.calls[0][2] is True
    pushed = tmp_path / "hub" / "me" / "tiny-rust" / "v1"
    assert {"README.md", "config.json", "sigil_export.json", "generation_config.json"} <= {p.name for p in pushed.iterdir()}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([str(folder), "--push-to-hub", "me/tiny-rust"]) == 2
    err = capsys.readouterr().err.strip()
    assert "HF_HUB_OFFLINE is set, so nothing was pushed to me/tiny-rust" in err and "\n" not in err
    with pytest.raises(SigilError, match="Pushing .* to the hub repo me/x failed"):
        push_to_hub(folder, "me/x", api=HfApi(endpoint="http://127.0.0.1:9", token="hf_test"))


def test_gguf_runs_the_llama_cpp_converter_or_says_what_to_pass(exports, tmp_path, capsys):
    folder = exports["nf4_roundtrip"]
    assert main([str(folder), "--gguf"]) == 2
    assert "--gguf needs the path of a llama.cpp checkout" in capsys.readouterr().err
    with pytest.raises(SigilError, match="convert_hf_to_gguf.py does not exist"):
        to_gguf(folder, str(tmp_path), "bfloat16")
    # a checkout's converter (llama.cpp is not installable here): called as `convert_hf_to_gguf.py DIR --outfile F --outtype T`
    (tmp_path / "convert_hf_to_gguf.py").write_text(
        "import sys, json\na = sys.argv\nopen(a[a.index('--outfile') + 1], 'w').write(json.dumps(a[1:]))\n")
    out = to_gguf(folder, str(tmp_path), "bfloat16")
    assert json.loads(out.read_text()) == [str(folder), "--outfile", str(folder / "model-bf16.gguf"), "--outtype", "bf16"]
    out.unlink()
    (tmp_path / "convert_hf_to_gguf.py").write_text("raise SystemExit('BPE pre-tokenizer was not recognized')\n")
    with pytest.raises(SigilError, match="convert_hf_to_gguf.py failed .*BPE pre-tokenizer"):
        to_gguf(folder, str(tmp_path), "bfloat16")


def test_export_refuses_to_overwrite_and_int8_roundtrip(run, exports):
    art = find_artifact(run)
    cfg = load_run_config(art.config)
    with pytest.raises(SigilError, match="already exists and is not empty"):
        export(art, cfg, exports["original"])
    cfg.quant.method = "int8"
    with pytest.raises(SigilError, match="nf4_roundtrip needs a 4-bit run"):
        export(art, cfg, exports["original"].parent / "int8")
    with pytest.raises(SigilError, match="already an export"):
        export(find_artifact(exports["original"]), cfg, exports["original"].parent / "again")


@needs_rustc
def test_evaluate_an_export_like_an_adapter_run(run, exports, capsys):
    """`python -m sigil_exp.evaluate <export>`: the merged model is evaluated like the adapter; on the
    two problems the adapter learned, every variant writes the canonical solution."""
    from sigil_exp.evaluate.__main__ import main as evaluate_main

    rates = {}
    for name, path in [("adapter", run), *exports.items()]:
        assert evaluate_main([str(path), "--limit", "2", "--device", "cpu"]) == 0, name
        out = (path if name != "adapter" else run) / "eval" / "metrics.json"
        rates[name] = json.loads(out.read_text())["metrics"]["eval/pass@1"]
    capsys.readouterr()
    with capsys.disabled():
        print(f"\n[export] pass@1 on the 2 trained problems: {rates}")
    assert rates["adapter"] == rates["nf4_roundtrip"] == 1.0
