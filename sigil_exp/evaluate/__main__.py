"""`python -m sigil_exp.evaluate`: evaluate a trained adapter or an export, re-execute saved
completions, or check a problem set.

    python -m sigil_exp.evaluate outputs/2026-11-28/10-00-00            # a run folder
    python -m sigil_exp.evaluate outputs/.../adapter --limit 10 --n-samples 5
    python -m sigil_exp.evaluate outputs/.../export-nf4_roundtrip       # a merged model (python -m sigil_exp.export)
    python -m sigil_exp.evaluate outputs/... --generate-only            # a GPU box without Rust: completions only
    python -m sigil_exp.evaluate --completions outputs/.../eval/completions.jsonl   # no model
    python -m sigil_exp.evaluate --check-problems --problems my_problems.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from sigil_exp.config import EvalConfig, SigilError

log = logging.getLogger("sigil_exp.evaluate")


def _eval_overrides(ev: EvalConfig, args: argparse.Namespace) -> EvalConfig:
    changes = {k: v for k, v in {
        "problems": args.problems, "limit": args.limit, "n_samples": args.n_samples, "workers": args.workers,
        "temperature": args.temperature, "sandbox": args.sandbox, "crate_size": args.crate_size,
        "clippy": True if args.clippy else None, "weights": args.weights, "batch_size": args.batch_size,
        "generate_only": True if args.generate_only else None,
    }.items() if v is not None}
    return dataclasses.replace(ev, **changes)


def _print_summary(metrics: dict[str, float], out_dir: Path) -> None:
    keys = ["eval/compile_rate"] + [k for k in metrics if k.startswith("eval/pass@") and k.count("/") == 1]
    print("  ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics))
    print(f"results: {out_dir / 'results.jsonl'}  metrics: {out_dir / 'metrics.json'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sigil_exp.evaluate",
                                 description="Rust compile/test evaluation of a trained adapter.")
    ap.add_argument("path", nargs="?", help="run folder, adapter folder or export folder")
    ap.add_argument("--completions", type=Path, help="re-execute this completions.jsonl (no model needed)")
    ap.add_argument("--check-problems", action="store_true", help="check that every canonical solution passes")
    ap.add_argument("--problems", help="problems JSONL (default: eval.problems of the run, else the bundled set)")
    ap.add_argument("--limit", type=int, help="only the first N problems")
    ap.add_argument("--n-samples", type=int, help="completions per problem")
    ap.add_argument("--temperature", type=float, help="0 = greedy")
    ap.add_argument("--workers", type=int, help="parallel compile/test workers")
    ap.add_argument("--crate-size", type=int, help="samples per compiled crate (1 = one rustc per sample)")
    ap.add_argument("--sandbox", choices=["auto", "namespaces", "rlimits"])
    ap.add_argument("--clippy", action="store_true", help="count clippy warnings too")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="override hardware.device of the run")
    ap.add_argument("--weights", choices=["auto", "trained", "dense", "merged"], help="eval.weights: what generation "
                    "multiplies by (trained: 4-bit + LoRA; dense: a bf16 copy, adapter beside; merged: adapter merged)")
    ap.add_argument("--batch-size", type=_batch_size, help="eval.batch_size: auto or a cap on rows per batch")
    ap.add_argument("--generate-only", action="store_true", help="write eval/completions.jsonl and stop (no Rust "
                    "here: execute them elsewhere with --completions)")
    ap.add_argument("--out", type=Path, help="output folder (default: <run>/eval, or next to --completions)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return _main(args)
    except SigilError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _batch_size(v: str):
    return v if v == "auto" else int(v)


def _main(args: argparse.Namespace) -> int:
    from sigil_exp.artifacts import find_artifact, load_for_generation, load_run_config
    from sigil_exp.evaluate import (
        check_problems,
        exec_config,
        execute_completions,
        load_problems,
        run_evaluation,
    )
    from sigil_exp.evaluate.generate import read_completions
    from sigil_exp.evaluate.sandbox import detect_sandbox

    art = find_artifact(args.path) if args.path else None
    cfg = load_run_config(art.config) if art else None
    ev = _eval_overrides(cfg.eval if cfg else EvalConfig(), args)

    if args.check_problems:
        problems = load_problems(ev.problems, ev.limit)
        failures = check_problems(problems, exec_config(ev), detect_sandbox(ev.sandbox))
        for f in failures:
            print(f"FAIL {f.task_id}: {f.reason}")
        print(f"{len(problems) - len({f.task_id for f in failures})}/{len(problems)} problems OK ({ev.problems})")
        return 1 if failures else 0

    if args.completions:
        completions = read_completions(args.completions)
        out = args.out or args.completions.resolve().parent
        metrics = execute_completions(completions, ev, out)
        _print_summary(metrics, out)
        return 0

    if art is None or cfg is None:
        raise SigilError("Nothing to evaluate: pass a run, adapter or export folder, --completions <jsonl>, "
                         "or --check-problems.")
    if args.device:
        cfg.hardware.device = args.device
    cfg.eval = ev
    model, tokenizer = load_for_generation(art, cfg)
    out = args.out or art.run or art.path
    metrics = run_evaluation(cfg, model, tokenizer, out)
    if ev.generate_only:
        print(f"generated {metrics['eval/gen_tokens_per_s']:.0f} new tokens/s; completions: "
              f"{out / 'eval' / 'completions.jsonl'} (execute: python -m sigil_exp.evaluate --completions <that file>)")
        return 0
    _print_summary(metrics, out / "eval")
    return 0


if __name__ == "__main__":
    sys.exit(main())
