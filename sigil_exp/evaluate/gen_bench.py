"""Evaluation's generation paths side by side: new tokens/s, batch, peak memory, and greedy token
agreement with the old path (free-running, and teacher-forced on the old path's tokens).

    python -m sigil_exp.evaluate.gen_bench --tiny                      # the code path on the CPU in seconds
    python -m sigil_exp.evaluate.gen_bench --model /tmp/m8b --shape 8b --ignore-stop --n-samples 10 --out gen.json
        # --shape builds an 8B-shaped random checkpoint into --model first if it holds none
        # (the same builder as `python -m sigil_exp.bench --build-model`)

Paths (each one `generate_tokens` call on the same problems, sampled at --temperature):
  old       4-bit base + LoRA (peft), transformers generate, batches of 8 in problem order: the
            evaluation before this benchmark (run on the first --old-rows rows only: it is slow)
  nf4_lora  4-bit base + LoRA, the own decode loop: every row in one batch as memory allows, sorted by
            prompt length, each problem prefilled once, finished rows dropped (what a small GPU keeps)
  dense     a bf16 copy of the dequantised 4-bit weights with the adapter beside it (not merged), the own
            loop: the default when the copy fits (eval.weights=auto)
  merged    the adapter merged into that bf16 copy (export's weights), the own loop (eval.weights=merged)
  static    dense, transformers generate with a static KV cache, compiled on CUDA (eval.compile=true)

Agreement, greedy, on the first --agree-problems problems: `token_agreement` compares each path's own
greedy text with the old path's position by position (after one flipped near-tie a row follows another
text, so this mixes rounding with divergence); `teacher_forced_agreement` feeds every path the old
path's tokens and counts the positions where it ranks the same token first (rounding alone).
--memory-gb caps what generation may hold, as a run's hardware.gpu_memory_gb does (24: consumer_24gb).

With random weights nothing stops early, so pass --ignore-stop (EOS suppressed, no brace stop):
every row then runs max_new_tokens and the rows are comparable. Without --adapter a LoRA r16 on all
seven projections with random non-zero B is attached. No W&B, no trl.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

PATHS = {  # name -> GenConfig changes
    "old": {"engine": "hf", "batch_size": 8, "weights": "trained"},
    "nf4_lora": {"engine": "sigil", "weights": "trained"},
    "dense": {"engine": "sigil", "weights": "dense"},
    "merged": {"engine": "sigil", "weights": "merged"},
    "static": {"engine": "static", "weights": "dense"},
}
DEFAULT_PATHS = ("old", "nf4_lora", "dense", "merged")


def load_bench_model(model_dir: str | Path, adapter_dir: str | Path | None, device: str):
    """(peft model on the 4-bit NF4 base, tokenizer) as training builds them; a tokenizer-less random
    checkpoint gets the tiny BPE (its ids 0/1/2 = the random config's bos/eos/pad)."""
    import torch
    from peft import PeftModel, get_peft_model

    from sigil_exp.config import HardwareConfig, LoraConfig, ModelConfig, QuantConfig
    from sigil_exp.model import load_base_model, load_tokenizer, peft_config

    mcfg = ModelConfig(name="bench", name_or_path=str(model_dir))
    base = load_base_model(mcfg, QuantConfig(), HardwareConfig(name="bench", device=device, attn_implementation="sdpa_varlen"))
    if any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = load_tokenizer(mcfg, str(model_dir))
    else:
        from sigil_exp.tiny import build_tokenizer

        tok = build_tokenizer(min(1024, base.config.vocab_size))
    if adapter_dir:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    else:
        torch.manual_seed(0)
        model = get_peft_model(base, peft_config(LoraConfig()))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0.0, 0.01)
    model.eval()
    return model, tok


def _peak_gb(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None


def _agreement(ref: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """Share of reference token positions where `other` has the same token, and of identical rows."""
    total = sum(len(r) for r in ref)
    same = sum(a == b for r, o in zip(ref, other, strict=True) for a, b in zip(r, o, strict=False))
    return {"token_agreement": round(same / max(total, 1), 4),
            "rows_identical": round(sum(r == o for r, o in zip(ref, other, strict=True)) / max(len(ref), 1), 4)}


def _forced_logits(model, tok, problems, weights: str, ref: list[list[int]]) -> list:
    """Float32 logits (on the CPU) that `weights`' model gives at each position of the reference's greedy
    tokens when fed the reference's own prefix, one full forward per problem."""
    import torch

    from sigil_exp.evaluate.generate import _free_cuda, _model_inputs, generation_model

    gen_model, _, _ = generation_model(model, weights)
    inputs = _model_inputs(tok, problems, "completion")
    device = next(gen_model.parameters()).device
    out = []
    with torch.inference_mode():
        for prompt, gen in zip(inputs, ref, strict=True):
            logits = gen_model(input_ids=torch.tensor([prompt + gen], device=device)).logits[0]
            out.append(logits[len(prompt) - 1:len(prompt) + len(gen) - 1].float().cpu())
    if gen_model is not model:
        del gen_model
        _free_cuda()
    return out


def _teacher_forced(ref_logits: list, logits: list) -> dict[str, float]:
    """Rounding alone, without free-running divergence (after one flipped near-tie a free-running row
    follows another text): the share of positions where this path ranks first the token the reference
    model ranks first on the same prefix, and the share of the disagreements that are near-ties (the
    reference's top-2 gap below this path's largest logit difference there)."""

    same = total = ties = 0
    for r, o in zip(ref_logits, logits, strict=True):
        if not len(r):
            continue
        agree = r.argmax(-1) == o.argmax(-1)
        top2 = r.topk(2, dim=-1).values
        near = (top2[:, 0] - top2[:, 1]) <= (o - r).abs().amax(-1)
        same, total = same + int(agree.sum()), total + len(r)
        ties += int((~agree & near).sum())
    return {"teacher_forced_agreement": round(same / max(total, 1), 4),
            "disagreements_at_near_ties": round(ties / max(total - same, 1), 4) if total > same else None,
            "forced_positions": total}


def bench_generation(model_dir, adapter_dir, problems, n_samples: int, paths=DEFAULT_PATHS, device: str = "cuda", *,
                     temperature: float = 0.8, max_new_tokens: int = 256, ignore_stop: bool = False,
                     old_rows: int | None = 16, agree_problems: int = 8, agree_tokens: int = 64,
                     batch_size: int = 0, memory_gb: float | None = None) -> list[dict[str, Any]]:
    """One row per path: {path, batch, rows, new_tokens, new_tokens_per_s, peak_gb, seconds, merge_s, ...,
    token_agreement, rows_identical, teacher_forced_agreement} (agreement: greedy, against the first
    path; `memory_gb` caps what generation may hold, as hardware.gpu_memory_gb does in a run)."""
    import torch

    from sigil_exp.evaluate.generate import GenConfig, generate_tokens

    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    model, tok = load_bench_model(model_dir, adapter_dir, device)
    base_cfg = GenConfig(n_samples=n_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, ignore_stop=ignore_stop, seed=0, memory_gb=memory_gb)
    rows = []
    for name in paths:
        probs = problems
        if name == "old" and old_rows:  # rows per problem = n_samples (sampled) or 1 (greedy)
            per = n_samples if temperature > 0 else 1
            probs = problems[:max(1, -(-old_rows // per))]
        cfg = replace(base_cfg, **PATHS[name])
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        g = generate_tokens(model, tok, probs, cfg)
        st = g.stats
        rows.append({"path": name, "engine": st["engine"], "model": st["model"], "batch": st["batch"],
                     "rows": st["rows"], "new_tokens": st["new_tokens"], "new_tokens_per_s": st["new_tokens_per_s"],
                     "peak_gb": _peak_gb(device), "seconds": st["seconds"], "merge_s": st["merge_s"],
                     "end_to_end_tokens_per_s": round(st["new_tokens"] / max(st["seconds"] + st["merge_s"], 1e-9), 1)})
        logging.getLogger(__name__).info("%s", rows[-1])
    greedy = replace(base_cfg, n_samples=1, temperature=0.0, max_new_tokens=agree_tokens)
    ref = None
    for row in rows:
        g = generate_tokens(model, tok, problems[:agree_problems], replace(greedy, **PATHS[row["path"]]))
        ids = [x for _, x in sorted(zip(g.rows, g.ids, strict=True))]
        ref = ref or ids
        row.update(_agreement(ref, ids))
    forced = {}
    for row in rows:
        w = PATHS[row["path"]]["weights"]
        forced[w] = forced.get(w) or _forced_logits(model, tok, problems[:agree_problems], w, ref)
        row.update(_teacher_forced(forced[PATHS[rows[0]["path"]]["weights"]], forced[w]))
    return rows


def profile_path(model_dir, adapter_dir, problems, n_samples: int, path: str, device: str, *, temperature: float,
                 max_new_tokens: int, memory_gb: float | None = None, top: int = 25) -> str:
    """torch.profiler's table (top `top` ops by device time) of one path generating `max_new_tokens`
    for every row: where a decode step's time goes. It explains a tokens/s figure; it is not one."""
    from torch.profiler import ProfilerActivity, profile

    from sigil_exp.evaluate.generate import GenConfig, generate_tokens

    model, tok = load_bench_model(model_dir, adapter_dir, device)
    cfg = GenConfig(n_samples=n_samples, temperature=temperature, max_new_tokens=max_new_tokens, ignore_stop=True,
                    memory_gb=memory_gb, **PATHS[path])
    generate_tokens(model, tok, problems[:2], replace(cfg, max_new_tokens=4))  # warm-up: kernels, allocator
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        g = generate_tokens(model, tok, problems, cfg)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    return f"{path}: {g.stats}\n" + prof.key_averages().table(sort_by=key, row_limit=top)


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ["path", "batch", "rows", "new_tokens", "new_tokens_per_s", "peak_gb", "seconds", "merge_s", "token_agreement",
            "teacher_forced_agreement", "disagreements_at_near_ties"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m sigil_exp.evaluate.gen_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder (random: python -m sigil_exp.bench --build-model)")
    ap.add_argument("--shape", help="build a random checkpoint of this shape (sigil_exp.bench SHAPES: 8b, 3b, 1b, "
                    "small, tiny) into --model when it holds no config.json")
    ap.add_argument("--adapter", help="LoRA adapter folder (default: a random r16 adapter on all projections)")
    ap.add_argument("--problems", default="pkg://assets/rust_problems.jsonl")
    ap.add_argument("--limit", type=int, help="only the first N problems")
    ap.add_argument("--n-samples", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--paths", default=",".join(DEFAULT_PATHS), help=f"comma-separated, from {', '.join(PATHS)}")
    ap.add_argument("--old-rows", type=int, default=16, help="rows the slow old path runs (0 = all)")
    ap.add_argument("--ignore-stop", action="store_true", help="no EOS / brace stop: every row runs max_new_tokens")
    ap.add_argument("--batch-size", type=int, default=0, help="cap on rows per batch (0 = as memory allows)")
    ap.add_argument("--memory-gb", type=float, help="cap on what generation may hold on the GPU, as a run's "
                    "hardware.gpu_memory_gb does (e.g. 24 for the consumer_24gb card)")
    ap.add_argument("--agree-problems", type=int, default=8)
    ap.add_argument("--agree-tokens", type=int, default=64)
    ap.add_argument("--device", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU: the code path in seconds")
    ap.add_argument("--out", type=Path, help="write the report as JSON here")
    ap.add_argument("--profile", metavar="PATH", help="instead: profile this path (torch.profiler, top ops by device "
                    "time) over --max-new-tokens steps and print the table")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    import torch

    from sigil_exp.evaluate.problems import load_problems

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    model_dir = args.model
    if args.tiny:
        from sigil_exp.bench import SHAPES, build_random_model

        model_dir = model_dir or str(build_random_model(SHAPES["tiny"], Path(tempfile.mkdtemp(prefix="gen_bench_")) / "model"))
        args.limit, args.n_samples = args.limit or 3, min(args.n_samples, 2)
        args.max_new_tokens, args.agree_problems, args.agree_tokens = min(args.max_new_tokens, 12), 2, 8
        args.ignore_stop, args.old_rows = True, 0
        torch.set_num_threads(1)
    if not model_dir:
        ap.error("pass --model DIR (or --tiny)")
    if args.shape and not (Path(model_dir) / "config.json").is_file():
        from sigil_exp.bench import SHAPES, build_random_model

        build_random_model(SHAPES[args.shape], Path(model_dir), device)
        if device == "cuda":
            torch.cuda.empty_cache()
    problems = load_problems(args.problems, args.limit)
    if args.profile:
        print(profile_path(model_dir, args.adapter, problems, args.n_samples, args.profile, device,
                           temperature=args.temperature, max_new_tokens=args.max_new_tokens, memory_gb=args.memory_gb))
        return {}
    t0 = time.perf_counter()
    rows = bench_generation(model_dir, args.adapter, problems, args.n_samples, [p for p in args.paths.split(",") if p],
                            device, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            ignore_stop=args.ignore_stop, old_rows=args.old_rows or None,
                            agree_problems=args.agree_problems, agree_tokens=args.agree_tokens,
                            batch_size=args.batch_size, memory_gb=args.memory_gb)
    report = {"command": "python -m sigil_exp.evaluate.gen_bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": str(model_dir), "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "problems": len(problems), "n_samples": args.n_samples, "temperature": args.temperature,
              "max_new_tokens": args.max_new_tokens, "ignore_stop": args.ignore_stop, "memory_gb": args.memory_gb,
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
              "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    print_table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
