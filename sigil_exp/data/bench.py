"""Preprocessing throughput: the rust_dir loader + filters + dedup + tokenisation over a real
corpus, first run (cold cache) and second run (cache hit), in MB of Rust source per second.

    apt-get install librust-tokio-dev librust-syn-dev librust-regex-dev ...   # real crate sources
    python -m sigil_exp.data.bench /usr/share/cargo/registry                 # data=phase1 filters
    python -m sigil_exp.data.bench /usr/share/cargo/registry --data phase2 --num-proc 2
    python -m sigil_exp.data.bench DIR --tokenizer /path/to/Meta-Llama-3.1-8B   # a real tokenizer
    python -m sigil_exp.data.bench /usr/share/cargo/registry --profile          # where the time goes

Without --tokenizer, a byte-level BPE asked for 32k tokens (about the bytes/token of Llama 3's on
code) is trained on the first 4 MB of the corpus and kept in <cache-dir>/bench_tokenizer; it
learns fewer than that on 4 MB, and the bench prints its real vocabulary size.
`--profile` adds a one-process run under cProfile with the time per stage (reading, test
handling, the other filters, dedup, tokenising, building the dataset): shares, not speeds,
since the profiler slows the Python parts more than the Rust tokenizer. On a shared machine the
wall-clock rate follows the load (printed); `first_cpu_s` (parent + workers) does not:
source_mb / first_cpu_s x num_proc is the first-run rate on idle cores.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import datasets  # noqa: F401 - imported before the clock starts
from omegaconf import OmegaConf

from sigil_exp.config import DataConfig, SourceConfig
from sigil_exp.data import build_datasets

CONF_DATA = Path(__file__).resolve().parents[2] / "conf" / "data"


def bench_tokenizer(corpus: Path, out: Path, vocab_size: int = 32_000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (out / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(out)
    texts, size = [], 0
    for f in sorted(corpus.rglob("*.rs")):
        try:
            t = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(t)
        size += len(t)
        if size > 4_000_000:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                 pad_token=specials[2])
    hf.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)  # named by its folder, as on the next use


def data_config(preset: str, root: str, num_proc: int) -> DataConfig:
    """The filters/format of conf/data/<preset>.yaml, with the corpus directory as its only source."""
    schema = OmegaConf.structured(DataConfig)
    preset_cfg = OmegaConf.load(CONF_DATA / f"{preset}.yaml")
    preset_cfg.pop("sources", None)
    merged = OmegaConf.merge(schema, preset_cfg, {"sources": [], "num_proc": num_proc, "cache": True})
    cfg: DataConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    cfg.sources = [SourceConfig(kind="rust_dir", path=root, name=Path(root).name)]
    return cfg


# stage -> the functions whose cumulative time it is (minus the stages nested in them)
STAGES = {
    "walk": ("walk_rust_dir",), "read": ("read_rust_file",), "tests (find + strip)": ("handle_tests",),
    "other filters": ("filter_record",), "minhash": ("minhash",), "dedup": ("check",),
    "tokenise": ("_encode_batch",), "build dataset": ("_to_dataset",),
}
NESTED = {"other filters": ("tests (find + strip)", "minhash")}


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the pool workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def profile(cfg: DataConfig, tokenizer, max_seq_len: int, cache_dir: Path) -> dict:
    """Seconds and share per stage of one uncached, one-process build under cProfile."""
    from dataclasses import replace

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(build_datasets, replace(cfg, num_proc=1, cache=False), tokenizer, max_seq_len, 0, str(cache_dir))
    total = time.perf_counter() - t0
    cum: dict[str, float] = {}
    for (path, _, func), (_, _, _, ct, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        for stage, funcs in STAGES.items():
            if func in funcs and "sigil_exp/data" in path.replace("\\", "/"):
                cum[stage] = cum.get(stage, 0.0) + ct
    for stage, inner in NESTED.items():
        cum[stage] = cum.get(stage, 0.0) - sum(cum.get(i, 0.0) for i in inner)
    cum["rest"] = total - sum(cum.values())
    return {k: {"s": round(v, 2), "share": round(v / total, 3)} for k, v in cum.items()} | {"total_s": round(total, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="directory of Rust crates (e.g. /usr/share/cargo/registry)")
    ap.add_argument("--data", default="phase1", help="conf/data preset whose filters to use (default phase1)")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder or hub id (default: train a 32k BPE)")
    ap.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder (cold first run)")
    ap.add_argument("--profile", action="store_true", help="also time each stage in one process (cProfile)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="sigil_bench_"))
    try:
        if args.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        else:
            tokenizer = bench_tokenizer(Path(args.root), cache_dir / "bench_tokenizer")
        cfg = data_config(args.data, args.root, args.num_proc)
        runs = []
        for label in ("first", "cached"):
            t0, c0 = time.perf_counter(), _cpu_s()
            bundle = build_datasets(cfg, tokenizer, args.max_seq_len, 0, str(cache_dir))
            runs.append((label, time.perf_counter() - t0, bundle.stats, _cpu_s() - c0))
        stats = runs[0][2]
        mb = stats["source_mb"]
        result = {
            "corpus": args.root, "preset": args.data, "num_proc": stats["num_proc"], "source_mb": mb,
            "tokenizer": tokenizer.name_or_path, "tokenizer_vocab": len(tokenizer),
            "first_s": round(runs[0][1], 2), "first_mb_per_s": round(mb / runs[0][1], 2),
            "first_cpu_s": round(runs[0][3], 2), "first_mb_per_cpu_s": round(mb / runs[0][3], 2),
            "cached_s": round(runs[1][1], 2), "cached_mb_per_s": round(mb / runs[1][1], 2),
            "cache_hit_second_run": runs[1][2]["cache_hit"],
            "files_seen": stats["records_seen"], "files_kept": stats["records_kept"],
            "drops": {k[len("drop/"):]: v for k, v in stats.items() if k.startswith("drop/")},
            "tests_stripped_records": stats["tests_stripped_records"],
            "train_sequences": stats["train_examples"], "eval_sequences": stats["eval_examples"],
            "train_tokens": stats["train_tokens"], "overlong_split": stats["overlong_split"],
            "load_avg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        }
        if args.profile:
            result["profile"] = profile(cfg, tokenizer, args.max_seq_len, cache_dir)
        print(json.dumps(result, indent=1))
        return result
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
