"""`python -m sigil_exp.evaluate`: evaluate a trained adapter, re-execute saved completions, or
check a problem set.

    python -m sigil_exp.evaluate outputs/2026-11-28/10-00-00            # a run folder
    python -m sigil_exp.evaluate outputs/.../adapter --limit 10 --n-samples 5
    python -m sigil_exp.evaluate --completions outputs/.../eval/completions.jsonl   # no model
    python -m sigil_exp.evaluate --check-problems --problems my_problems.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from sigil_exp.config import EvalConfig, RunConfig, SigilError

log = logging.getLogger("sigil_exp.evaluate")


def find_run(path: Path) -> tuple[Path, Path, Path]:
    """(config file, adapter folder, run folder) for a run folder or an adapter folder."""
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise SigilError(f"{path} is not a folder; pass a run folder (outputs/<date>/<time>) or its adapter/ folder.")
    if (path / "adapter_config.json").is_file():
        adapter, run = path, path.parent
    elif (path / "adapter" / "adapter_config.json").is_file():
        adapter, run = path / "adapter", path
    else:
        raise SigilError(f"{path} holds neither adapter_config.json nor adapter/adapter_config.json; "
                         "pass a finished run folder or its adapter/ folder.")
    config = run / "resolved_config.yaml"
    if not config.is_file():
        raise SigilError(f"{config} does not exist, so the model and prompt format are unknown; "
                         "pass a run folder written by `python -m sigil_exp`.")
    return config, adapter, run


def load_run_config(config: Path) -> RunConfig:
    from omegaconf import OmegaConf

    from sigil_exp.config import to_object

    try:
        return to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(config)))
    except SigilError:
        raise
    except Exception as e:  # omegaconf's errors name the key
        raise SigilError(f"{config} does not match the RunConfig schema ({type(e).__name__}: {e}); "
                         "re-create it with the current sigil_exp.") from None


def _eval_overrides(ev: EvalConfig, args: argparse.Namespace) -> EvalConfig:
    changes = {k: v for k, v in {
        "problems": args.problems, "limit": args.limit, "n_samples": args.n_samples, "workers": args.workers,
        "temperature": args.temperature, "sandbox": args.sandbox, "crate_size": args.crate_size,
        "clippy": True if args.clippy else None,
    }.items() if v is not None}
    return dataclasses.replace(ev, **changes)


def _print_summary(metrics: dict[str, float], out_dir: Path) -> None:
    keys = ["eval/compile_rate"] + [k for k in metrics if k.startswith("eval/pass@") and k.count("/") == 1]
    print("  ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics))
    print(f"results: {out_dir / 'results.jsonl'}  metrics: {out_dir / 'metrics.json'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sigil_exp.evaluate",
                                 description="Rust compile/test evaluation of a trained adapter.")
    ap.add_argument("path", nargs="?", help="run folder or adapter folder")
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
    ap.add_argument("--out", type=Path, help="output folder (default: <run>/eval, or next to --completions)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return _main(args)
    except SigilError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from sigil_exp.evaluate import (
        check_problems,
        exec_config,
        execute_completions,
        load_problems,
        run_evaluation,
    )
    from sigil_exp.evaluate.generate import read_completions
    from sigil_exp.evaluate.sandbox import detect_sandbox

    cfg = load_run_config(find_run(Path(args.path))[0]) if args.path else None
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

    if cfg is None:
        raise SigilError("Nothing to evaluate: pass a run or adapter folder, --completions <jsonl>, or --check-problems.")
    config, adapter, run = find_run(Path(args.path))
    if args.device:
        cfg.hardware.device = args.device
    cfg.eval = ev
    model, tokenizer = load_model(cfg, adapter)
    out = args.out or run
    metrics = run_evaluation(cfg, model, tokenizer, out)
    _print_summary(metrics, out / "eval")
    print(json.dumps({k: round(v, 4) for k, v in metrics.items() if k.count("/") == 1}))
    return 0


def load_model(cfg: RunConfig, adapter: Path):
    """Base model + the adapter (peft), and the tokenizer saved with the adapter."""
    from peft import PeftModel

    from sigil_exp.model import load_base_model, load_tokenizer

    has_tokenizer = any((adapter / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(cfg.model, str(adapter)) if has_tokenizer else load_tokenizer(cfg.model)
    base = load_base_model(cfg.model, cfg.quant, cfg.hardware)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    return model, tokenizer


if __name__ == "__main__":
    sys.exit(main())
