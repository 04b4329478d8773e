"""Deduplication across all sources, first occurrence wins (source order, then file order).

exact    same normalised content hash (filters.content_key).
minhash  also near-duplicates: MinHash signatures (filters.minhash) bucketed by LSH bands; a
         candidate counts as a duplicate when the signatures agree on >= threshold of their
         positions (the estimated Jaccard similarity of the token-shingle sets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sigil_exp.data.filters import NUM_PERM


def lsh_shape(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows) whose S-curve midpoint (1/b)^(1/r) sits a little below the threshold:
    recall first; the signature comparison then removes the false candidates."""
    best = (1, num_perm)
    target = max(0.05, threshold - 0.1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        mid = (1 / bands) ** (1 / rows)
        if mid <= threshold and abs(mid - target) < abs((1 / best[0]) ** (1 / best[1]) - target):
            best = (bands, rows)
    return best


@dataclass
class DedupState:
    mode: str  # none | exact | minhash
    threshold: float = 0.85
    seen: set[str] = field(default_factory=set)
    bands: list[dict[bytes, list[int]]] = field(default_factory=list)
    signatures: list[np.ndarray] = field(default_factory=list)
    shape: tuple[int, int] = (0, 0)


def new_state(mode: str, threshold: float) -> DedupState:
    st = DedupState(mode=mode, threshold=threshold)
    if mode == "minhash":
        st.shape = lsh_shape(threshold)
        st.bands = [{} for _ in range(st.shape[0])]
    return st


def check(st: DedupState, key: str, signature: np.ndarray | None) -> str | None:
    """None if the record is new (and remember it), else the drop reason."""
    if st.mode == "none":
        return None
    if key in st.seen:
        return "duplicate_exact"
    if st.mode == "minhash" and signature is not None:
        bands, rows = st.shape
        keys = [signature[b * rows:(b + 1) * rows].tobytes() for b in range(bands)]
        candidates = {i for b, k in enumerate(keys) for i in st.bands[b].get(k, ())}
        for i in candidates:
            if np.mean(st.signatures[i] == signature) >= st.threshold:
                return "duplicate_near"
        idx = len(st.signatures)
        st.signatures.append(signature)
        for b, k in enumerate(keys):
            st.bands[b].setdefault(k, []).append(idx)
    st.seen.add(key)
    return None
