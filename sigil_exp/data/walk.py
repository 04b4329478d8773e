"""Which files a source names, and what a path says about a file.

Walks and `**` globs follow symbolic links but read each real file once: a directory already
visited (a link back up the tree, a second link to the same folder) is not entered again, and
a second name for a file already listed (a symlink, a hard link) is reported, not read.

Path rules work on path components, not substrings; paths are crate- or repo-relative, and
`src/` starts the crate's module tree, where folder names are module names:
  data.filters.skip_paths  `name/` matches a folder named `name` (fnmatch patterns allowed, `a/b/`
                           consecutive folders) outside `src/`: `vendor/`, `target/` at a crate
                           or repo root, not the module `src/target/`. `name` without a slash
                           matches a file or folder whose name fnmatches it or holds it as a
                           whole word (split at `_`, `-`, `.`): `generated` drops
                           `foo_generated.rs` and `generated/`, not `degenerated.rs`.
  test conventions         a `tests/` (`test/`, `testing/`, `test_utils/`) folder, or a file named
                           `tests.rs`, `*_test.rs`, `*_tests.rs`, `test_*.rs`: a test file only
                           when it holds `#[test]`-style functions outside a cfg(test) module
                           (filters.py decides); `t_test.rs` or a public `test.rs` API is code.
  benches/, examples/      folders outside `src/`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path

_WORD_SPLIT = re.compile(r"[_\-.]")
_TEST_DIRS = {"tests", "test", "testing", "test_utils"}
_TEST_FILE = re.compile(r"^(?:tests|.+_tests?|test_.+)\.rs$")


def _dirs_outside_src(rel: str) -> tuple[list[str], list[str]]:
    """(all components, the folder components above the first `src`) of a relative path; a
    trailing `/` marks a folder."""
    parts = [p for p in rel.split("/") if p and p != "."]
    dirs = parts if rel.endswith("/") else parts[:-1]
    return parts, dirs[:dirs.index("src")] if "src" in dirs else dirs


def _has_run(dirs: list[str], seq: list[str]) -> bool:
    return any(all(fnmatchcase(dirs[i + k], s) for k, s in enumerate(seq)) for i in range(len(dirs) - len(seq) + 1))


def skip_pattern(rel: str, patterns: list[str]) -> str | None:
    """The first `data.filters.skip_paths` pattern that matches `rel` (rules above), or None."""
    parts, outside = _dirs_outside_src(rel)
    for p in patterns:
        if p.endswith("/"):
            if _has_run(outside, [s for s in p.split("/") if s]):
                return p
        elif any(fnmatchcase(name, p) or p.lower() in _WORD_SPLIT.split(name.lower()) for name in parts):
            return p
    return None


def in_tool_dir(rel: str, name: str) -> bool:
    """`rel` lies in a folder `name` outside `src/` (benches/, examples/)."""
    return name in _dirs_outside_src(rel)[1]


def test_convention(rel: str) -> bool:
    """`rel` is where tests live by convention (a tests/ folder, `*_test.rs`, ...)."""
    parts = [p for p in rel.split("/") if p]
    return bool(parts) and (bool(_TEST_DIRS.intersection(parts[:-1])) or bool(_TEST_FILE.match(parts[-1])))


# --------------------------------------------------------------------------------- walking
def walk_once(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk(root, followlinks=True) that enters each real directory once, names sorted; a
    link to a directory already entered (a loop, a second link) is left out of `dirnames`. The
    caller may prune `dirnames` further in place, as with os.walk."""
    seen: set[tuple[int, int]] = set()
    try:
        st = os.stat(root)
        seen.add((st.st_dev, st.st_ino))
    except OSError:
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        filenames.sort()
        keep = []
        for d in dirnames:
            try:
                st = os.stat(os.path.join(dirpath, d))
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident not in seen:
                seen.add(ident)
                keep.append(d)
        dirnames[:] = keep
        yield dirpath, dirnames, filenames


def file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob pattern (relative; `**` = any folders, `*`/`?`/`[..]` within one name, no leading
    dot matched by a wildcard, as glob.glob) as a regex over '/'-joined relative paths."""
    out = []
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(r"(?:[^/.][^/]*/)*" if not last else r"(?:[^/.][^/]*/)*[^/.][^/]*")
            continue
        piece = "" if part.startswith(".") else r"(?!\.)"
        j = 0
        while j < len(part):
            c = part[j]
            if c == "*":
                piece += "[^/]*"
            elif c == "?":
                piece += "[^/]"
            elif c == "[" and part.find("]", j + 2) > 0:
                k = part.find("]", j + 2)
                body = part[j + 1:k]
                piece += "[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]"
                j = k
            else:
                piece += re.escape(c)
            j += 1
        out.append(piece + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z")


def expand(path: Path, raw: str, suffixes: tuple[str, ...]) -> tuple[list[Path], int]:
    """(files named by a file, a folder (those ending in `suffixes`) or a glob, each real file
    once, sorted; number of second names skipped). Missing paths give an empty list."""
    files: list[Path] = []
    if any(c in raw for c in "*?["):
        parts = str(path).split("/")
        fixed = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
        base = Path("/".join(parts[:fixed]) or "/")
        rest = parts[fixed:]
        rx = _glob_regex("/".join(rest))
        for dirpath, dirnames, filenames in walk_once(base):
            rel_dir = os.path.relpath(dirpath, base).replace(os.sep, "/")
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            if "**" not in rest and rel_dir.count("/") >= len(rest) - 1:
                dirnames[:] = []  # no `**`: the pattern names no deeper folder
            files.extend(Path(dirpath) / fn for fn in filenames if rx.match(rel_dir + fn))
    elif path.is_dir():
        for dirpath, _, filenames in walk_once(path):
            files.extend(Path(dirpath) / fn for fn in filenames if fn.endswith(suffixes))
    elif path.exists():
        files = [path]
    seen: set[tuple[int, int]] = set()
    unique = []
    for f in sorted(files):
        ident = file_identity(str(f))
        if ident is None or ident in seen or not f.is_file():
            continue
        seen.add(ident)
        unique.append(f)
    return unique, len(files) - len(unique)
