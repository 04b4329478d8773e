"""`python -m sigil_exp.bench`: the parent process that runs every row (each in its own process) and
writes the JSON report after every row."""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from sigil_exp.bench.configs import (
    GPU_PRESETS,
    MEMORY_PRESET,
    ROOT,
    SHAPES,
    SPEED_PRESETS,
    _fname,
    _log,
    build_random_model,
    real_text_tokens,
)
from sigil_exp.bench.e2e import E2E_DATA, e2e_targets, print_e2e, run_e2e
from sigil_exp.bench.step import run_row
from sigil_exp.bench.summary import _versions, print_table, summarise


def _row_specs(args, work: Path, model_dir: Path) -> list[dict[str, Any]]:
    """Rows in priority order (a run cut short still reports the important ones)."""
    base = {"tiny": args.tiny, "model_dir": str(model_dir), "work_dir": str(work), "warmup": args.warmup,
            "speed_steps": args.steps, "loss_batch": args.loss_batch, "loss_seq": args.seq, "profile": False}
    # the naive recipe as measured in docs/gpu-baseline.md: a plain step, fp32 adapters, no autocast
    naive_best = dict(base, name=f"naive_{args.naive_batch}x{args.seq}", recipe="naive", micro_batch=args.naive_batch,
                      seq=args.seq, loss_steps=0, speed_steps=args.naive_steps, warmup=min(args.warmup, 1),
                      autocast=False, profile=args.profile)
    naive_1 = dict(base, name=f"naive_1x{args.seq}", recipe="naive", micro_batch=1, seq=args.seq,
                   loss_steps=args.loss_steps, autocast=False)
    specs = [naive_1] if args.naive_batch == 1 else [naive_best, naive_1]
    for p in sorted(args.presets, key=lambda p: (p not in SPEED_PRESETS, p != "h200", p)):
        seq = args.long_seq if p == MEMORY_PRESET and args.long_seq else args.seq
        mb = (1 if p == MEMORY_PRESET else args.micro_batch) if args.micro_batch or p == MEMORY_PRESET else None
        if args.tiny and mb is None:
            mb = 2
        specs.append(dict(base, name=f"{p}_{'auto' if mb is None else mb}x{seq}", recipe=p, micro_batch=mb, seq=seq,
                          loss_steps=args.loss_steps, profile=args.profile and p in SPEED_PRESETS))
    if not args.no_amp_naive:  # the same naive recipe as trl's SFTTrainer(bf16=True) runs it: autocast, bf16 adapters
        if args.naive_batch != 1:
            specs.append(dict(naive_best, name=f"naive+amp_{args.naive_batch}x{args.seq}", autocast=True,
                              profile=False))
        specs.append(dict(naive_1, name=f"naive+amp_1x{args.seq}", autocast=True, profile=False))
    if args.ablate:  # each lever of the ablation preset reverted alone, speed only, at one fixed micro-batch
        levers = [("lora_fused", False), ("liger_kernel", False), ("upcast_non_lora", True),
                  ("attn_implementation", "sdpa"), ("gradient_checkpointing", True), ("lora.dropout", 0.0)]
        p, mb = args.ablate, args.ablate_batch
        abl = dict(base, recipe=p, micro_batch=mb, seq=args.seq, loss_steps=0, speed_steps=2, warmup=1, ablation=True)
        if args.ablate_base:
            specs.append(dict(abl, name=f"{p}_{mb}x{args.seq}:as-is"))
        for k, v in levers:
            if not (args.tiny and k == "liger_kernel"):
                specs.append(dict(abl, name=f"{p}_{mb}x{args.seq}:{k}={v}", overrides={k: v}))
    return specs


def _run_child(spec: dict[str, Any], work: Path, timeout: int) -> dict[str, Any]:
    spec_file = work / f"spec_{_fname(spec['name'])}.json"
    spec_file.write_text(json.dumps(spec))
    res_file = work / f"row_{_fname(spec['name'])}.json"
    res_file.unlink(missing_ok=True)
    env = {**os.environ, "SIGIL_BENCH_WORK": str(work), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "sigil_exp.bench", "--row", str(spec_file)], env=env, cwd=str(ROOT),
                       capture_output=True, text=True, timeout=timeout)
    (work / f"log_{_fname(spec['name'])}.txt").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if res_file.is_file():
        row = json.loads(res_file.read_text())
    else:
        tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
        row = {"name": spec["name"], "recipe": spec["recipe"], "status": "failed", "error": " | ".join(tail)}
    row["process_s"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(prog="python -m sigil_exp.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny Llama on the CPU: the code path in seconds")
    ap.add_argument("--presets", default=",".join(GPU_PRESETS), help="comma-separated hardware presets")
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="model shape (default 8b, or tiny)")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; tiny 64)")
    ap.add_argument("--long-seq", type=int, default=None, help=f"{MEMORY_PRESET}'s sequence length (default 8192)")
    ap.add_argument("--naive-batch", type=int, default=None, help="naive recipe's micro-batch (default 16)")
    ap.add_argument("--micro-batch", type=int, default=None, help="fix every speed preset's micro-batch (default: auto)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5)")
    ap.add_argument("--naive-steps", type=int, default=None, help="timed steps of the naive best row (default 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2)")
    ap.add_argument("--loss-steps", type=int, default=None, help="loss-agreement steps (default 30)")
    ap.add_argument("--loss-batch", type=int, default=1, help="sequences per loss-agreement step")
    ap.add_argument("--profile", action="store_true", help="profile one step of naive and the speed presets")
    ap.add_argument("--ablate", default=None, help="also run this preset with each lever reverted alone (speed only)")
    ap.add_argument("--ablate-batch", type=int, default=4, help="micro-batch of the ablation rows")
    ap.add_argument("--no-amp-naive", action="store_true", help="skip the naive recipe under bf16 autocast")
    ap.add_argument("--ablate-base", action="store_true", help="also the ablation preset as-is at --ablate-batch")
    ap.add_argument("--in-process", action="store_true", help="run rows in this process (default for --tiny)")
    ap.add_argument("--work-dir", default=None, help="model, tokens and per-row files (default /tmp/sigil_bench[_tiny])")
    ap.add_argument("--out", default=None, help="JSON report path (default <work-dir>/bench.json)")
    ap.add_argument("--e2e", default="h200,consumer_24gb,naive,naive_mb1,plain_trl",
                    help="end-to-end rows through `python -m sigil_exp` (presets, naive, naive_mb1, plain_trl); '' = none")
    ap.add_argument("--e2e-data", default=",".join(E2E_DATA), help="bundled,pipeline: the real data sets of the e2e rows")
    ap.add_argument("--e2e-steps", type=int, default=None, help="optimizer steps per e2e row (default 8; 2 are warm-up)")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end rows")
    ap.add_argument("--gen", action="store_true", help="also the evaluation's generation rows on the same model "
                    "(sigil_exp.evaluate.gen_bench: old path, 4-bit + LoRA batched, merged; ~5 min at 8B)")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--build-model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--row-timeout", type=int, default=900, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.build_model:  # child: make the random checkpoint on the GPU, then give the GPU back
        import torch

        build_random_model(json.loads(args.shape_json), Path(args.build_model),
                           "cuda" if torch.cuda.is_available() else "cpu")
        return None
    if args.row:  # child: one row
        import logging

        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        spec = json.loads(Path(args.row).read_text())
        try:
            row = run_row(spec)
        except Exception as e:  # the parent records it; the traceback goes to the row log
            traceback.print_exc()
            row = {"name": spec["name"], "recipe": spec["recipe"], "status": "failed", "error": f"{type(e).__name__}: {e}"}
        Path(spec["work_dir"], f"row_{_fname(spec['name'])}.json").write_text(json.dumps(row, default=str))
        return None

    tiny = args.tiny
    shape = dict(SHAPES[args.shape or ("tiny" if tiny else "8b")])
    if args.layers:
        shape["layers"] = args.layers
    args.seq = args.seq or (64 if tiny else 2048)
    args.long_seq = args.long_seq if args.long_seq is not None else (128 if tiny else 8192)
    args.naive_batch = args.naive_batch or (4 if tiny else 16)
    args.steps = args.steps if args.steps is not None else (2 if tiny else 5)
    args.naive_steps = args.naive_steps if args.naive_steps is not None else (2 if tiny else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    args.loss_steps = args.loss_steps if args.loss_steps is not None else (10 if tiny else 30)
    args.presets = [p for p in args.presets.split(",") if p]
    work = Path(args.work_dir or f"/tmp/sigil_bench{'_tiny' if tiny else ''}").expanduser()
    work.mkdir(parents=True, exist_ok=True)
    for f in list(work.glob("adapter_*.pt")) + list(work.glob("row_*.json")):
        f.unlink()
    os.environ["SIGIL_BENCH_WORK"] = str(work)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    threads = torch.get_num_threads()
    if tiny:  # tiny matmuls: extra threads only spin against each other (and against other jobs on CI)
        torch.set_num_threads(1)
    try:
        return _run_all(args, tiny, shape, work, argv)
    finally:
        torch.set_num_threads(threads)


def _run_all(args, tiny: bool, shape: dict[str, int], work: Path, argv) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    tag = "_".join(f"{k[0]}{v}" for k, v in shape.items())
    model_dir = work / f"model_{tag}"
    if not (model_dir / "config.json").is_file():
        if tiny or args.in_process or not torch.cuda.is_available():
            build_random_model(shape, model_dir)
        else:
            subprocess.run([sys.executable, "-m", "sigil_exp.bench", "--build-model", str(model_dir), "--shape-json",
                            json.dumps(shape)], check=True, cwd=str(ROOT))
    if not any(model_dir.glob("tokenizer*")):  # the e2e rows tokenise real text: the tiny BPE, saved with the model
        from sigil_exp.tiny import build_tokenizer

        build_tokenizer(min(1024, shape["vocab"])).save_pretrained(model_dir)
    n_tok = args.loss_steps * args.loss_batch * args.seq
    ids, source = real_text_tokens(max(n_tok, 1), shape["vocab"])
    torch.save(torch.tensor(ids, dtype=torch.long), work / "tokens.pt")
    _log(f"real text: {len(ids)} tokens from {source}")

    specs = _row_specs(args, work, model_dir)
    out = Path(args.out) if args.out else work / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": "python -m sigil_exp.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "shape": shape, "seq": args.seq, "tiny": tiny, "versions": _versions(), "real_text": source,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not tiny else "cpu",
        "step": "faithful SFTTrainer step: trl collator, Trainer optimizer, bf16 autocast, clip, scheduler; "
                "grad_accum 1; wall clock with a device sync per step",
        "naive": "the naive recipe as measured in docs/gpu-baseline.md runs a plain step (fp32 adapters, no "
                 "autocast); naive+amp is the same recipe under bf16 autocast with bf16 adapters, as trl's "
                 "SFTTrainer(bf16=True) runs it",
        "flops": "model = 4N + 6 LoRA + causal attention (fwd+2x bwd); hardware adds the recomputed forward",
        "dequant_cache": "none: every row keeps only the 4-bit base weights and dequantises per matmul",
        "rows": [],
    }
    if tiny:
        report["tiny_overrides"] = "device=cpu, liger_kernel=false, optimizer=adamw_torch (CUDA-only otherwise)"
    recipes = [r for r in args.e2e.split(",") if r]
    if recipes:  # the real trainer on real data first: a run cut short still reports them
        report["e2e"] = run_e2e(recipes, [d for d in args.e2e_data.split(",") if d], model_dir=str(model_dir), work=work,
                                steps=args.e2e_steps or (3 if tiny else 8), tiny=tiny)
        report["e2e_targets"] = e2e_targets(report["e2e"])
        out.write_text(json.dumps(report, indent=2, default=str))
    rows = report["rows"]
    for spec in specs if not args.e2e_only else []:
        _log(f"row {spec['name']} ...")
        if args.in_process or tiny:
            try:
                row = run_row(spec)
            except Exception as e:
                traceback.print_exc()
                row = {"name": spec["name"], "recipe": spec["recipe"], "status": "failed",
                       "error": f"{type(e).__name__}: {e}"}
            gc.collect()
        else:
            row = _run_child(spec, work, args.row_timeout)
        rows.append(row)
        sp = row.get("speed", {})
        _log(f"row {row['name']}: {row.get('status')} {sp.get('tokens_per_s', '-')} tok/s, "
             f"alloc {row.get('peak_allocated_gb', '-')} GB, est {row.get('estimate', {}).get('total_gb', '-')} GB "
             f"{row.get('error', '')[:200]}")
        report.update(summarise(rows, args, shape, work))
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(report, indent=2, default=str))  # after every row: a cut-short run still reports
    if args.gen:
        report["generation"] = _generation_rows(model_dir, work, tiny)
        out.write_text(json.dumps(report, indent=2, default=str))
    if rows:
        print_table(report)
    print_e2e(report.get("e2e", []))
    print(f"e2e targets: {json.dumps(report.get('e2e_targets'))}")
    _log(f"report -> {out}")
    return report


def _generation_rows(model_dir: Path, work: Path, tiny: bool) -> list[dict[str, Any]]:
    """The generation benchmark in its own process (its GPU memory is its own): one row per path."""
    gen = work / "gen.json"
    gen.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "sigil_exp.evaluate.gen_bench", "--model", str(model_dir), "--ignore-stop",
           "--out", str(gen), *(["--tiny"] if tiny else [])]
    _log("generation rows ...")
    p = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True)
    (work / "log_gen.txt").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if not gen.is_file():
        return [{"path": "all", "status": "failed", "error": " | ".join(p.stderr.strip().splitlines()[-3:])}]
    return json.loads(gen.read_text())["rows"]


if __name__ == "__main__":
    main()
