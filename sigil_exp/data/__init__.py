"""Data: sources -> filters -> dedup -> mix -> format -> tokenize -> train/val.

`build_datasets(cfg, tokenizer, max_seq_len, seed, cache_dir, run_dir)` is the one entry point
the trainer calls; it returns tokenised train/eval datasets and the per-stage statistics.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from sigil_exp.config import DataConfig, SigilError
from sigil_exp.data.format import chat_messages, completion_prompt
from sigil_exp.paths import resolve


@dataclass
class DataBundle:
    train: Dataset
    eval: Dataset | None
    stats: dict[str, Any] = field(default_factory=dict)


def _read_jsonl(path: Path, on_error: str, stats: dict[str, int]) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SigilError(f"Data file {path} does not exist; fix data.sources.N.path.")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if on_error == "skip":
                    stats["malformed"] = stats.get("malformed", 0) + 1
                    continue
                raise SigilError(f"{path}:{lineno} is not a valid JSON object ({e}); fix the line or set data.on_error=skip.") from None
            records.append(rec)
    return records


def _split_of(rec: dict[str, Any], val_fraction: float) -> str:
    key = json.dumps([rec.get(k) for k in ("prompt", "gen", "text", "messages")], sort_keys=True)
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if bucket < val_fraction else "train"


def _tokenize(rec: dict[str, Any], fmt: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """input_ids and completion_mask (1 = token counts in the loss); EOS appended."""
    eos = [tokenizer.eos_token_id]
    if fmt == "text" or "text" in rec:
        ids = tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + eos
        return ids, [1] * len(ids)
    if fmt == "chat" or "messages" in rec:
        messages = rec.get("messages") or chat_messages(rec["prompt"], rec["gen"])
        prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False)
        p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        return full, [0] * len(p) + [1] * (len(full) - len(p))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p = bos + tokenizer(completion_prompt(rec["prompt"]), add_special_tokens=False)["input_ids"]
    g = tokenizer(rec["gen"], add_special_tokens=False)["input_ids"] + eos
    return p + g, [0] * len(p) + [1] * len(g)


def build_datasets(
    cfg: DataConfig, tokenizer: Any, max_seq_len: int, seed: int, cache_dir: str, run_dir: Path | None = None
) -> DataBundle:
    stats: dict[str, int] = {}
    rows: dict[str, list[dict[str, list[int]]]] = {"train": [], "eval": []}
    for src in cfg.sources:
        for rec in _read_jsonl(resolve(src.path), cfg.on_error, stats):
            ids, mask = _tokenize(rec, cfg.format, tokenizer)
            if len(ids) > max_seq_len:
                stats["overlong_truncated"] = stats.get("overlong_truncated", 0) + 1
                ids, mask = ids[:max_seq_len], mask[:max_seq_len]
            rows[_split_of(rec, cfg.val_fraction)].append({"input_ids": ids, "completion_mask": mask})
    if not rows["train"]:
        raise SigilError(f"data={cfg.name} yielded no training examples ({stats}); check data.sources.")
    stats.update(train_examples=len(rows["train"]), eval_examples=len(rows["eval"]))
    train = Dataset.from_list(rows["train"]).shuffle(seed=seed)
    ev = Dataset.from_list(rows["eval"]) if rows["eval"] else None
    return DataBundle(train=train, eval=ev, stats=stats)
