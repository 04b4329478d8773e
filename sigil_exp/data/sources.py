"""Sources: each `data.sources[i]` becomes a stream of `Record`s (or `Drop`s, counted by reason).

kinds:
  jsonl     SigilDERG {prompt, gen, _task_type, _source, _source_crate, _source_file, _split},
            {text} or {messages} lines; a file, a directory of *.jsonl / *.json(l).gz, or a glob.
  parquet   the same columns in parquet files (file, directory or glob).
  hf        a Hugging Face dataset: hub id (cached or streamed), a `save_to_disk` folder, or a
            local folder/file `load_dataset` understands (parquet/json/csv). Works offline from the cache.
  rust_dir  a tree of .rs files (crates checkout, monorepo, ~/.cargo/registry/src,
            /usr/share/cargo/registry); each file carries its crate and crate-relative path.
Metadata (`_task_type`, `_source`, ...) is kept for weighting and stats, never fed to the model.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sigil_exp.config import SigilError, SourceConfig
from sigil_exp.data.format import messages_to_pair
from sigil_exp.data.walk import expand, file_identity, skip_pattern, walk_once
from sigil_exp.paths import resolve

log = logging.getLogger(__name__)

KINDS = ("jsonl", "parquet", "rust_dir", "hf")
TEXT_COLUMNS = ("text", "content", "code")  # tried in order when source.text_field is not set
PATH_COLUMNS = ("_source_file", "path", "max_stars_repo_path", "file_path")
META_FIELDS = ("_task_type", "_source", "_source_crate", "_source_file", "_split")
ROLES = ("system", "user", "assistant", "tool")  # {messages} roles the chat templates know


@dataclass
class Record:
    kind: str  # completion ({prompt, gen}) | text | chat ({messages})
    source: str  # the data source's label
    origin: str  # where it came from, for stats examples: file:line or crate-dir/path
    prompt: str | None = None
    gen: str | None = None
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    path: str | None = None  # source-file path relative to its crate/repo (path filters)
    crate: str | None = None
    task_type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # hash of the normalised content: dedup and the train/eval split
    signature: Any = None  # MinHash signature (numpy) when data.filters.dedup=minhash
    n_bytes: int = 0  # size of the source text (throughput)


@dataclass
class Drop:
    reason: str
    origin: str


@dataclass
class RustFile:
    """A .rs file found by the rust_dir walk, read and filtered in a worker."""

    abspath: str
    origin: str  # path relative to the walk root
    path: str  # path relative to the crate root
    crate: str | None
    source: str


def source_name(src: SourceConfig) -> str:
    if src.name:
        return src.name
    names = [p for p in src.path.rstrip("/").split("/") if p and not any(c in p for c in "*?[")]  # not glob parts
    base = names[-1] if names else src.path
    return re.sub(r"\.(jsonl|json|parquet)(\.gz)?$", "", base) or src.kind


# ------------------------------------------------------------------------------ records from rows
def record_from_row(row: dict[str, Any], source: str, origin: str, text_field: str | None = None,
                    fmt: str | None = None) -> Record:
    """One JSON object / table row as a Record; ValueError (with the reason) when it has no usable
    fields, a message has an unknown role, or (fmt=completion/text) a conversation has several turns."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    meta = {k: row[k] for k in META_FIELDS if row.get(k) is not None}
    path = next((row[c] for c in PATH_COLUMNS if isinstance(row.get(c), str)), None)
    common = dict(source=source, origin=origin, path=path, meta=meta,
                  crate=row.get("_source_crate"), task_type=row.get("_task_type"))
    gen = row.get("gen", row.get("completion"))
    if row.get("prompt") is not None and gen is not None:
        if not isinstance(row["prompt"], str) or not isinstance(gen, str):
            raise ValueError("prompt and gen must be strings")
        return Record(kind="completion", prompt=row["prompt"], gen=gen, n_bytes=len(row["prompt"]) + len(gen), **common)
    if row.get("messages") is not None:
        msgs = row["messages"]
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise ValueError("messages must be a non-empty list of {role, content} strings")
        bad = next((i for i, m in enumerate(msgs) if m["role"] not in ROLES), None)
        if bad is not None:
            raise ValueError(f"messages[{bad}] has the role {msgs[bad]['role']!r}, not one of {', '.join(ROLES)}; "
                             f"rename it in the data")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("messages has no assistant turn to learn from")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        if fmt is not None and fmt != "chat":
            messages_to_pair(msgs)  # ValueError for a multi-turn conversation
        return Record(kind="chat", messages=msgs, n_bytes=sum(len(m["content"]) for m in msgs), **common)
    for col in (text_field,) if text_field else TEXT_COLUMNS:
        if isinstance(row.get(col), str):
            return Record(kind="text", text=row[col], n_bytes=len(row[col]), **common)
    wanted = f"the text_field {text_field!r}" if text_field else "prompt+gen, messages or text"
    raise ValueError(f"has none of the fields {wanted}")


def _expand(src: SourceConfig, index: int, suffixes: tuple[str, ...]) -> list[Path]:
    raw = src.path
    p = resolve(raw)
    if not any(c in raw for c in "*?[") and not p.exists():
        raise SigilError(f"data.sources.{index}.path={raw!r} does not exist; fix the path (pkg:// = bundled asset).")
    files, repeats = expand(p, raw, suffixes)
    if repeats:
        log.info("data.sources.%d: %d file names lead to a file already listed (links); each file is read once",
                 index, repeats)
    if not files:
        raise SigilError(f"data.sources.{index}.path={raw!r} holds no {'/'.join(suffixes)} files; fix the path or kind.")
    return files


def _corrupt(where: str, what: str, e: BaseException, on_error: str) -> Drop:
    """Drop("corrupt") under on_error=skip, else the one-sentence error."""
    if on_error == "skip":
        log.warning("data: skipping the rest of %s (%s: %s)", where, type(e).__name__, e)
        return Drop("corrupt", where)
    why = str(e).split("\n")[0][:120] or type(e).__name__
    raise SigilError(f"{where} {what} ({why}); replace or remove the file, or set data.on_error=skip to "
                     f"skip and count such files.") from None


def iter_jsonl(src: SourceConfig, index: int, on_error: str, fmt: str | None = None) -> Iterator[Record | Drop]:
    name = source_name(src)
    for f in _expand(src, index, (".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        try:
            fh = gzip.open(f, "rb") if f.name.endswith(".gz") else f.open("rb")
        except OSError:
            yield Drop("unreadable", str(f))
            continue
        lineno = 0
        with fh:
            try:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    origin = f"{f}:{lineno}"
                    try:
                        rec = record_from_row(json.loads(line.decode("utf-8")), name, origin, src.text_field, fmt)
                    except (ValueError, UnicodeDecodeError) as e:
                        if on_error == "skip":
                            yield Drop("malformed", origin)
                            continue
                        why = str(e).split("\n")[0][:160]
                        raise SigilError(f"{origin} is not a usable record ({why}); fix that line or set "
                                         f"data.on_error=skip to skip and count such lines.") from None
                    yield rec
            except (EOFError, OSError, zlib.error) as e:  # a truncated or corrupt .gz, a read error
                yield _corrupt(f"{f}:{lineno + 1}", "cannot be read to the end (truncated or corrupt)", e, on_error)


def _iter_rows(rows: Iterator[dict[str, Any]], src: SourceConfig, label: str, on_error: str,
               fmt: str | None = None) -> Iterator[Record | Drop]:
    name = source_name(src)
    for i, row in enumerate(rows):
        origin = f"{label}#{i}"
        try:
            yield record_from_row(row, name, origin, src.text_field, fmt)
        except ValueError as e:
            if on_error == "skip":
                yield Drop("malformed", origin)
                continue
            raise SigilError(f"{origin} is not a usable record ({e}); set data.sources.N.text_field or "
                             f"data.on_error=skip.") from None


def iter_parquet(src: SourceConfig, index: int, on_error: str, fmt: str | None = None) -> Iterator[Record | Drop]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in _expand(src, index, (".parquet",)):
        try:
            pf = pq.ParquetFile(f)
            rows = (row for batch in pf.iter_batches(batch_size=1024) for row in batch.to_pylist())
            yield from _iter_rows(rows, src, str(f), on_error, fmt)
        except (OSError, pa.ArrowException) as e:
            yield _corrupt(str(f), "is not a readable parquet file", e, on_error)


def load_hf(src: SourceConfig, index: int):
    """The dataset behind a kind=hf source: a save_to_disk folder, a local folder/file, or a hub id
    (from the local cache when offline). Fails with one sentence when none of these works."""
    import datasets

    p = resolve(src.path)
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise SigilError(f"data.sources.{index}.split={src.split!r} is not in {p} "
                                 f"(splits: {', '.join(ds)}); set data.sources.{index}.split.")
            ds = ds[src.split]
        return ds.to_iterable_dataset() if src.streaming else ds
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        return datasets.load_dataset(str(p) if p.exists() else src.path, name=src.subset, data_dir=src.data_dir,
                                     split=src.split, streaming=src.streaming)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "not found / no network"
        where = ("it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading"
                 if offline else "it is neither a local path nor reachable on the Hub")
        raise SigilError(f"data.sources.{index}.path={src.path!r} could not be loaded ({type(e).__name__}): {where}; "
                         f"run once online to cache it (or unset HF_HUB_OFFLINE), or point "
                         f"data.sources.{index}.path to a local copy.") from None


def iter_hf(src: SourceConfig, index: int, on_error: str, fmt: str | None = None) -> Iterator[Record | Drop]:
    ds = load_hf(src, index)
    yield from _iter_rows(iter(ds), src, f"{src.path}[{src.split}]", on_error, fmt)


# ----------------------------------------------------------------------------------- rust_dir
_PKG_NAME = re.compile(r'^\s*\[package\][^\[]*?^\s*name\s*=\s*"([^"]+)"', re.M | re.S)


def crate_name(cargo_toml: Path) -> str | None:
    try:
        m = _PKG_NAME.search(cargo_toml.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    return m.group(1) if m else None


def walk_rust_dir(src: SourceConfig, index: int, skip_paths: list[str]) -> Iterator[RustFile | Drop]:
    """Every file under the root, in a stable order, each real file once: .rs files as RustFile,
    the rest as Drops (non_rust; skip_path for whole pruned folders, counting their .rs files;
    same_path for a second name of a file already listed). skip_paths match crate-relative paths."""
    root = resolve(src.path)
    if not root.is_dir():
        raise SigilError(f"data.sources.{index}.path={src.path!r} is not a directory of .rs files; "
                         f"fix the path (kind=rust_dir).")
    name = source_name(src)
    crates: dict[str, tuple[str | None, str]] = {}
    seen_files: dict[tuple[int, int], str] = {}

    def rel_to(path: str, base: str | Path) -> str:
        return os.path.relpath(path, base).replace(os.sep, "/")

    for dirpath, dirnames, filenames in walk_once(root):
        rel_dir = rel_to(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        parent = crates.get(os.path.dirname(dirpath), (None, str(root)))
        if "Cargo.toml" in filenames:
            crates[dirpath] = (crate_name(Path(dirpath) / "Cargo.toml") or os.path.basename(dirpath), dirpath)
        else:
            crates[dirpath] = parent
        crate, crate_root = crates[dirpath]
        kept_dirs = []
        for d in dirnames:
            pat = skip_pattern(rel_to(os.path.join(dirpath, d), crate_root) + "/", skip_paths)
            if pat is None:
                kept_dirs.append(d)
                continue
            for sub, _, files in os.walk(os.path.join(dirpath, d)):
                for fn in sorted(files):
                    if fn.endswith(".rs"):
                        yield Drop("skip_path", f"{rel_to(os.path.join(sub, fn), root)} ({pat})")
        dirnames[:] = kept_dirs
        for fn in filenames:
            rel = rel_dir + fn
            if not fn.endswith(".rs"):
                yield Drop("non_rust", rel)
                continue
            abspath = os.path.join(dirpath, fn)
            ident = file_identity(abspath)
            if ident is not None and ident in seen_files:
                yield Drop("same_path", f"{rel} (= {seen_files[ident]})")
                continue
            if ident is not None:
                seen_files[ident] = rel
            crate_rel = rel_to(abspath, crate_root)
            pat = skip_pattern(crate_rel, skip_paths)
            if pat is not None:
                yield Drop("skip_path", f"{rel} ({pat})")
                continue
            yield RustFile(abspath=abspath, origin=rel, path=crate_rel, crate=crate, source=name)


def fingerprint(src: SourceConfig) -> str:
    """Cheap identity of a source's current content (sizes + mtimes of the files it names) for the
    cache key."""
    if src.kind == "hf" and not resolve(src.path).exists():
        return f"hub:{src.path}:{src.subset}:{src.data_dir}:{src.split}"
    p = resolve(src.path)
    h = hashlib.sha256()
    if p.is_dir():
        paths = [Path(d) / fn for d, _, names in walk_once(p) for fn in names]
    else:
        paths = expand(p, src.path, ())[0]
    for f in paths:
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
