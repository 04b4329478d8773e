"""`python -m sigil_exp.generate`: a quick look at what a run (or an export) writes, streamed.

    python -m sigil_exp.generate outputs/2026-11-28/10-00-00 --prompt "/// Adds two numbers.
    fn add(a: i32, b: i32) -> i32 {"
    python -m sigil_exp.generate outputs/.../export-nf4_roundtrip --problems my.jsonl --limit 3 --temperature 0.8
    python -m sigil_exp.generate outputs/... --problems pkg://assets/rust_problems.jsonl --limit 2

The prompt is rendered in the run's training format (`data.format`: completion = BOS + prompt + a
newline; chat = the chat template), exactly as evaluation prompts it. A run or adapter loads the
run's base as trained (4-bit) + the adapter; an export loads the merged checkpoint. Greedy by
default (`--temperature 0.8` samples). A prompt ending in `{` (a signature) stops after the
function's closing brace; anything else at EOS or --max-new-tokens.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sigil_exp.config import SigilError


def stream(model, tokenizer, prompt: str, fmt: str, entry_point: str | None, max_new_tokens: int,
           temperature: float, top_p: float) -> str:
    """Generate one completion of `prompt`, printing it to stdout as it comes; returns the generated text."""
    import torch
    from transformers import GenerationConfig, TextStreamer

    from sigil_exp.data.format import encode_prompt
    from sigil_exp.evaluate.generate import eos_ids, make_stopping_criteria

    fmt = "completion" if fmt == "text" else fmt
    ids = encode_prompt(prompt, fmt, tokenizer)
    device = next(model.parameters()).device
    sample = temperature > 0
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
                           top_p=top_p if sample else None, top_k=None, eos_token_id=eos_ids(tokenizer),
                           pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    stopping = [make_stopping_criteria(tokenizer, len(ids), fmt, [entry_point or ""])] \
        if entry_point is not None or prompt.rstrip().endswith("{") else []
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        seq = model.generate(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long, device=device), generation_config=cfg, stopping_criteria=stopping,
                             streamer=streamer)
    return tokenizer.decode(seq[0, len(ids):], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sigil_exp.generate",
                                 description="Stream completions from a run, adapter or export in its training prompt format.")
    ap.add_argument("path", help="run folder, adapter folder or export folder")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text (e.g. a doc comment + signature ending in `{`)")
    src.add_argument("--problems", help="HumanEval-Rust JSONL: each problem's prompt (pkg://assets/rust_problems.jsonl)")
    ap.add_argument("--limit", type=int, help="only the first N problems")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cuda", "cpu"], help="override hardware.device of the run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        import torch

        from sigil_exp.artifacts import find_artifact, load_for_generation, load_run_config
        from sigil_exp.evaluate.problems import load_problems

        art = find_artifact(args.path)
        cfg = load_run_config(art.config)
        if args.device:
            cfg.hardware.device = args.device
        items = [(args.prompt, None, None)] if args.prompt is not None else [
            (p.prompt, p.entry_point, p.task_id) for p in load_problems(args.problems, args.limit)]
        model, tokenizer = load_for_generation(art, cfg)
        torch.manual_seed(args.seed)
        for prompt, entry, task in items:
            if task is not None:
                print(f"### {task}\n{prompt}", end="" if prompt.endswith("\n") else "\n", flush=True)
            stream(model, tokenizer, prompt, cfg.data.format, entry, args.max_new_tokens, args.temperature, args.top_p)
    except SigilError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
