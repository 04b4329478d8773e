"""The benchmark's end-to-end rows: `python -m sigil_exp` itself (Hydra config, the project's data
pipeline, SFTTrainer with the preset's packing and collator) on real variable-length Rust data, one
subprocess per row, steady-state tokens/s and MFU read back from the run's metrics.json.

Data sets:
    bundled    the bundled corpus (pkg://assets/rust_sample.jsonl): short, unequal documents
    pipeline   a SigilDERG-shaped {prompt, gen} set built from the bundled real Rust, lengths spread
               log-uniformly from ~50 to max_seq_len tokens (`pipeline_set`)
Recipes: the GPU presets as composed by Hydra, `naive` (the naive QLoRA recipe written as overrides
of the same entrypoint: fp32 upcast, reentrant checkpointing, plain sdpa, no packing, micro-batch 16),
`naive_mb1` (the same at micro-batch 1) and `plain_trl` (bench/plain_trl.py: what a user writes).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sigil_exp.bench.configs import ROOT, _log

E2E_DATA = ("bundled", "pipeline")
NAIVE = ["hardware=h100", "hardware.name=naive", "hardware.gradient_checkpointing=true",
         "hardware.checkpointing_reentrant=true", "hardware.attn_implementation=sdpa", "hardware.packing=false",
         "hardware.liger_kernel=false", "hardware.upcast_non_lora=true", "hardware.lora_fused=false",
         "hardware.auto_micro_batch=false", "hardware.micro_batch_size=16", "hardware.grad_accum=1",
         "hardware.adapter_dtype=bfloat16", "hardware.dataloader_workers=2", "hardware.gpu_memory_gb=null"]
# Row -> (overrides, max_seq_len). consumer_24gb trains at 8192 with grad_accum 4 (one step stays short;
# tokens/s does not depend on the accumulation count).
RECIPES: dict[str, tuple[list[str], int]] = {
    "h200": (["hardware=h200"], 2048),
    "h100": (["hardware=h100"], 2048),
    "a100_80gb": (["hardware=a100_80gb"], 2048),
    "consumer_24gb": (["hardware=consumer_24gb", "hardware.grad_accum=4"], 8192),
    "naive": (NAIVE, 2048),
    "naive_mb1": ([*NAIVE, "hardware.micro_batch_size=1", "hardware.grad_accum=16"], 2048),
}
# --tiny: the same rows on the CPU (what only exists on CUDA replaced, everything else as configured)
TINY = ["hardware.device=cpu", "hardware.precision=${cpu_precision:}", "hardware.liger_kernel=false", "hardware.optimizer=adamw_torch",
        "hardware.gpu_memory_gb=null", "hardware.auto_micro_batch=false", "hardware.dataloader_workers=0"]


def pipeline_set(out: Path, tokenizer_dir: str | Path, n: int = 1500, max_len: int = 2048, min_len: int = 50,
                 seed: int = 0) -> Path:
    """{prompt, gen} rows as the SigilDERG pipeline writes them, from the bundled real Rust (corpus
    gens and problem solutions), each cut at a line boundary to a length drawn log-uniformly from
    [min_len, max_len] tokens of `tokenizer_dir`'s tokenizer. Deterministic for a seed."""
    from transformers import AutoTokenizer

    from sigil_exp.paths import resolve

    if out.is_file():
        return out
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = [json.loads(line) for line in resolve("pkg://assets/rust_sample.jsonl").open() if line.strip()]
    probs = [json.loads(line) for line in resolve("pkg://assets/rust_problems.jsonl").open() if line.strip()]
    prompts = [r["prompt"] for r in rows]
    code_lines = [ln for r in rows for ln in r["gen"].splitlines()]
    code_lines += [ln for p in probs for ln in (p["prompt"] + p.get("canonical_solution", "")).splitlines()]
    line_tokens = [len(tok(ln + "\n", add_special_tokens=False)["input_ids"]) for ln in code_lines]
    rng = random.Random(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f:
        for i in range(n):
            target = math.exp(rng.uniform(math.log(min_len), math.log(max_len)))
            prompt = rng.choice(prompts)
            budget = target - len(tok(prompt, add_special_tokens=False)["input_ids"]) - 8
            start = rng.randrange(len(code_lines))
            gen, used, j = [], 0, start
            while used < budget or not gen:
                k = j % len(code_lines)
                if used + line_tokens[k] > budget and gen:
                    break
                gen.append(code_lines[k])
                used += line_tokens[k]
                j += 1
            f.write(json.dumps({"prompt": prompt, "gen": "\n".join(gen) + "\n", "_task_type": "code_generation",
                                "_source": "bench_pipeline_shaped", "_source_file": f"row{i}"}) + "\n")
    tmp.rename(out)
    return out


def _data_overrides(data: str, pipeline_file: Path | None) -> list[str]:
    if data == "bundled":
        return ["data=rust_sample", "data.val_fraction=0"]
    return ["data=jsonl", f"data.sources.0.path={pipeline_file}", "data.val_fraction=0", "data.num_proc=4"]


def row_command(recipe: str, data: str, *, model_dir: str, work: Path, steps: int, tiny: bool,
                pipeline_file: Path | None) -> tuple[list[str], Path]:
    run_dir = work / f"e2e_{recipe}_{data}"
    if recipe == "plain_trl":
        jsonl = pipeline_file if data == "pipeline" else Path(str(ROOT / "sigil_exp/assets/rust_sample.jsonl"))
        cmd = [sys.executable, "-m", "sigil_exp.bench.plain_trl", "--model", model_dir, "--data", str(jsonl),
               "--steps", str(steps), "--out", str(run_dir / "metrics.json"), *(["--cpu", "--seq", "256"] if tiny else [])]
        return cmd, run_dir
    overrides, seq = RECIPES[recipe]
    cmd = [sys.executable, "-m", "sigil_exp", *overrides, *(TINY if tiny else []), f"model.name_or_path={model_dir}",
           "model.name=bench", f"model.max_seq_len={256 if tiny else seq}", *_data_overrides(data, pipeline_file),
           f"train.max_steps={steps}", "train.eval_steps=0", "train.save_steps=1000000", "train.logging_steps=1",
           "eval.enabled=false", "wandb.mode=disabled", f"cache_dir={work / 'cache'}", f"hydra.run.dir={run_dir}"]
    return cmd, run_dir


def run_e2e(recipes: list[str], datasets: list[str], *, model_dir: str, work: Path, steps: int, tiny: bool,
            timeout: int = 900) -> list[dict[str, Any]]:
    """One `python -m sigil_exp` (or plain trl script) process per (recipe, data); the report's "e2e" list."""
    pipeline_file = None
    if "pipeline" in datasets:
        pipeline_file = pipeline_set(work / f"pipeline_{'tiny' if tiny else 'full'}.jsonl", model_dir,
                                     n=300 if tiny else 1500, max_len=256 if tiny else 2048)
    entries = []
    for data in datasets:
        for recipe in recipes:
            if recipe == "naive_mb1" and data != "bundled":
                continue  # the consumer card's reference: one data set is enough
            cmd, run_dir = row_command(recipe, data, model_dir=model_dir, work=work, steps=steps, tiny=tiny,
                                       pipeline_file=pipeline_file)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.json").unlink(missing_ok=True)
            _log(f"e2e {recipe} on {data} ...")
            t0 = time.perf_counter()
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
            try:
                p = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=timeout)
                log, rc = p.stdout + "\n--- stderr ---\n" + p.stderr, p.returncode
            except subprocess.TimeoutExpired as e:
                log, rc = f"timed out after {timeout}s\n{e.stdout or ''}\n{e.stderr or ''}", -1
            (work / f"log_e2e_{recipe}_{data}.txt").write_text(log if isinstance(log, str) else str(log))
            m = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
            entry = {"preset": recipe, "data": data, "status": "ok" if rc == 0 and m.get("train/tokens_per_s") else "failed",
                     "steady_tokens_per_s": m.get("train/tokens_per_s"), "mfu": m.get("train/mfu"),
                     "step_s": m.get("train/step_s"), "peak_allocated_gb": m.get("sys/peak_mem_gb"),
                     "micro_batch": m.get("derived/micro_batch_size"), "grad_accum": m.get("derived/grad_accum"),
                     "seq": 256 if tiny else (2048 if recipe == "plain_trl" else RECIPES[recipe][1]),
                     "steady_steps": m.get("train/steady_steps"), "first_loss": m.get("train/loss_first"),
                     "process_s": round(time.perf_counter() - t0, 1),
                     "command": " ".join(cmd[1:]).replace(str(work), "$WORK")}
            if entry["status"] != "ok":
                entry["error"] = " | ".join((m.get("error") or log).strip().splitlines()[-4:])[:600]
            _log(f"e2e {recipe} on {data}: {entry['status']} {entry['steady_tokens_per_s']} tok/s, "
                 f"peak {entry['peak_allocated_gb']} GB")
            entries.append(entry)
    _ratios(entries)
    return entries


def _ratios(entries: list[dict[str, Any]]) -> None:
    """x_naive / x_plain_trl against the reference rows on the same data."""
    ref = {(e["preset"], e["data"]): e.get("steady_tokens_per_s") for e in entries}
    for e in entries:
        t = e.get("steady_tokens_per_s")
        for key, name in (("naive", "x_naive"), ("plain_trl", "x_plain_trl"), ("naive_mb1", "x_naive_mb1")):
            r = ref.get((key, e["data"]))
            if t and r and e["preset"] != key:
                e[name] = round(t / r, 2)


def print_e2e(entries: list[dict[str, Any]]) -> None:
    if not entries:
        return
    head = (f"{'e2e row':<22}{'data':<10}{'status':<8}{'mbxseq':>10}{'tok/s':>9}{'MFU':>7}{'step s':>8}"
            f"{'peak GB':>9}{'xnaive':>8}{'xtrl':>7}")
    print("\n" + head + "\n" + "-" * len(head))

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, int | float) else "-"

    for e in entries:
        print(f"{e['preset']:<22}{e['data']:<10}{e['status']:<8}{str(e.get('micro_batch')) + 'x' + str(e['seq']):>10}"
              f"{f(e.get('steady_tokens_per_s'), ',.0f'):>9}{f(e.get('mfu'), '.1%'):>7}{f(e.get('step_s'), '.2f'):>8}"
              f"{f(e.get('peak_allocated_gb'), '.1f'):>9}{f(e.get('x_naive'), '.2f'):>8}{f(e.get('x_plain_trl'), '.2f'):>7}")
        if e["status"] != "ok":
            print(f"    {e.get('error', '')[:300]}")


def e2e_targets(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The speed targets on real data: the fast presets >= 12k tokens/s, >= 4x naive, >= 3x plain trl on each
    data set; consumer_24gb under 16 GB and >= 2.5x the naive recipe at micro-batch 1."""
    out: dict[str, Any] = {}
    for e in entries:
        if e["preset"] in ("h200", "h100") and e["status"] == "ok":
            out[f"{e['preset']}/{e['data']}"] = {
                "tokens_per_s": e["steady_tokens_per_s"], "x_naive": e.get("x_naive"), "x_plain_trl": e.get("x_plain_trl"),
                "met": bool(e["steady_tokens_per_s"] >= 12_000 and (e.get("x_naive") or 0) >= 4
                            and (e.get("x_plain_trl") or 0) >= 3)}
        if e["preset"] == "consumer_24gb" and e["status"] == "ok" and e.get("x_naive_mb1"):
            out[f"consumer_24gb/{e['data']}"] = {
                "peak_allocated_gb": e["peak_allocated_gb"], "x_naive_mb1": e.get("x_naive_mb1"),
                "met": bool((e["peak_allocated_gb"] or 99) < 16 and (e.get("x_naive_mb1") or 0) >= 2.5)}
    return out
