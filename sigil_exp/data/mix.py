"""Split, weight and mix records. Deterministic given the seed; the split depends only on each
record's content, so adding a source never moves an existing record between train and eval."""

from __future__ import annotations

import math
import zlib

import numpy as np

from sigil_exp.config import SigilError
from sigil_exp.data.sources import Record


def split_of(key: str, val_fraction: float) -> str:
    """'eval' for the records whose content hash falls in the first val_fraction of the hash space."""
    return "eval" if int(key[:8], 16) / 0x100000000 < val_fraction else "train"


def copies(n: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    """How many times each of n records appears under `weight`: floor(weight) times each, plus
    one more for a seeded round(frac(weight) * n) of them (2.0 doubles, 0.5 keeps half)."""
    base = math.floor(weight)
    counts = np.full(n, base, dtype=np.int64)
    extra = round((weight - base) * n)
    if extra:
        counts[rng.choice(n, size=extra, replace=False)] += 1
    return counts


def _rng(seed: int, label: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(label.encode())])


def _repeat(records: list[Record], counts: np.ndarray) -> list[Record]:
    return [r for r, c in zip(records, counts, strict=True) for _ in range(int(c))]


def apply_task_weights(records: list[Record], task_weights: dict[str, float], seed: int) -> list[Record]:
    """Over/under-sample by `_task_type` (records without one, or not listed, keep weight 1)."""
    if not task_weights:
        return records
    counts = np.ones(len(records), dtype=np.int64)
    for task, w in sorted(task_weights.items()):
        idx = np.array([i for i, r in enumerate(records) if r.task_type == task], dtype=np.int64)
        if idx.size:
            counts[idx] = copies(idx.size, float(w), _rng(seed, "task:" + task))
    return _repeat(records, counts)


def check_task_weights(task_weights: dict[str, float], seen: set[str]) -> None:
    unknown = sorted(set(task_weights) - seen)
    if unknown:
        raise SigilError(f"data.task_weights names {', '.join(unknown)}, which no record's _task_type matches "
                         f"(seen: {', '.join(sorted(seen)) or 'none'}); fix or remove the key.")


def mix(per_source: list[list[Record]], weights: list[float], names: list[str], mode: str, seed: int
        ) -> list[Record]:
    """Each source resampled by its weight (a multiplier: 2.0 = every record twice, 0.5 = a seeded
    half), then combined: sequential (source blocks in order), round_robin (one from each in
    turn), weighted (all shuffled together)."""
    weighted = [
        _repeat(recs, copies(len(recs), w, _rng(seed, "source:" + name)))
        for recs, w, name in zip(per_source, weights, names, strict=True)
    ]
    if mode == "sequential":
        return [r for recs in weighted for r in recs]
    if mode == "round_robin":
        out: list[Record] = []
        for i in range(max((len(x) for x in weighted), default=0)):
            out.extend(recs[i] for recs in weighted if i < len(recs))
        return out
    flat = [r for recs in weighted for r in recs]
    order = np.random.default_rng(seed).permutation(len(flat))
    return [flat[i] for i in order]
