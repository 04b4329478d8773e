"""The processed-dataset cache: `<cache_dir>/datasets/<key>/{train,eval,train_origins,eval_origins,report.json}`
(`*_origins`: where each sequence came from, for `python -m sigil_exp.data.preview`).

key = hash(data config + each source's fingerprint (paths, sizes, mtimes) + tokenizer identity
(name_or_path + vocab/special-token/chat-template hash) + max_seq_len + seed + PIPELINE_VERSION).
Written into a temporary sibling folder and renamed into place, so an error or a kill never
leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sigil_exp.config import DataConfig

PIPELINE_VERSION = 2  # bump when preprocessing changes what a given config produces
PARTS = ("train", "eval", "train_origins", "eval_origins")


def config_dict(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # a DictConfig


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\0{tok}\n".encode("utf-8", "surrogatepass"))
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None),
                         type(tokenizer).__name__], default=str).encode())
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "")), "vocab_hash": h.hexdigest()[:16],
            "vocab_size": len(vocab)}


def cache_key(cfg: DataConfig, tokenizer_id: dict[str, Any], max_seq_len: int, seed: int,
              fingerprints: list[str]) -> str:
    data = {k: v for k, v in config_dict(cfg).items() if k not in ("num_proc", "cache")}  # no effect on output
    blob = json.dumps({"data": data, "tokenizer": tokenizer_id, "max_seq_len": max_seq_len,
                       "seed": seed, "sources": fingerprints, "version": PIPELINE_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def entry_dir(cache_dir: str, key: str) -> Path:
    return Path(cache_dir).expanduser() / "datasets" / key


def load(entry: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """({part: dataset} for the PARTS present, report) from a complete cache entry, or None."""
    from datasets import load_from_disk

    report_file = entry / "report.json"
    if not report_file.is_file():
        return None
    report = json.loads(report_file.read_text())
    return {p: load_from_disk(str(entry / p)) for p in PARTS if (entry / p).is_dir()}, report


def save_atomic(entry: Path, parts: dict[str, Any], report: dict[str, Any]) -> None:
    """Write the entry (the datasets in `parts` that are not None) into a temporary folder next
    to it, then rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        for name, ds in parts.items():
            if ds is not None:
                ds.save_to_disk(str(tmp / name))
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))  # last: marks completeness
        if entry.exists() and not (entry / "report.json").is_file():
            shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry left by an older version
        try:
            os.rename(tmp, entry)
        except OSError:  # another run wrote the same entry first: keep theirs
            if not (entry / "report.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
