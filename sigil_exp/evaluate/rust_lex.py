"""A small Rust scanner: brace depth outside string/char literals and comments.

Enough of Rust's lexical grammar to find where a function body ends and whether a snippet is
self-contained: line and (nested) block comments, strings with escapes, byte/C strings, raw
strings (`r#"..."#`, `br"..."`), char literals (`'{'`, `'\\''`, `'\\u{7b}'`) told apart from
lifetimes and labels (`'a`, `'outer:`).
"""

from __future__ import annotations

from dataclasses import dataclass

_IDENT = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


@dataclass(frozen=True)
class Scan:
    depth: int  # brace depth at the end, relative to the start
    min_depth: int  # lowest depth reached (negative: a `}` closed something opened before)
    end: int | None  # index just after the `}` that brought the depth to `stop_depth`, if any
    open_token: str | None  # "string", "raw_string", "block_comment", "char" if the text ends inside one


def scan(text: str, start_depth: int = 0, stop_depth: int | None = None) -> Scan:
    """Track `{`/`}` over `text`; stop at the first `}` that brings the depth to `stop_depth`."""
    depth = mind = start_depth
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "/" and i + 1 < n and text[i + 1] == "/":
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if c == "/" and i + 1 < n and text[i + 1] == "*":
            level, i = 1, i + 2
            while i < n and level:
                if text.startswith("/*", i):
                    level, i = level + 1, i + 2
                elif text.startswith("*/", i):
                    level, i = level - 1, i + 2
                else:
                    i += 1
            if level:
                return Scan(depth, mind, None, "block_comment")
            continue
        if c in "rbc" and (i == 0 or text[i - 1] not in _IDENT):
            j = i + 1 if c == "r" else (i + 2 if text.startswith("r", i + 1) else -1)
            if j > 0:
                hashes = 0
                while j < n and text[j] == "#":
                    hashes, j = hashes + 1, j + 1
                if j < n and text[j] == '"':  # raw string; `r#ident` (raw identifier) falls through
                    close = '"' + "#" * hashes
                    k = text.find(close, j + 1)
                    if k < 0:
                        return Scan(depth, mind, None, "raw_string")
                    i = k + len(close)
                    continue
            elif i + 1 < n and text[i + 1] in "\"'":  # b"..", c"..", b'x'
                i += 1
                c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            if i >= n:
                return Scan(depth, mind, None, "string")
            i += 1
            continue
        if c == "'":
            i = _char_or_lifetime(text, i)
            if i < 0:
                return Scan(depth, mind, None, "char")
            continue
        if c in _IDENT:  # skip whole identifiers so `br` inside `abr"` is not a raw-string prefix
            while i < n and text[i] in _IDENT:
                i += 1
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            mind = min(mind, depth)
            if stop_depth is not None and depth == stop_depth:
                return Scan(depth, mind, i + 1, None)
        i += 1
    return Scan(depth, mind, None, None)


def _char_or_lifetime(text: str, i: int) -> int:
    """`text[i]` is a quote: return the index after a char literal, or after the quote of a
    lifetime/label; -1 if an escaped char literal is cut off."""
    n = len(text)
    if i + 1 < n and text[i + 1] == "\\":
        k = text.find("'", i + 3)
        return -1 if k < 0 else k + 1
    if i + 2 < n and text[i + 2] == "'":
        return i + 3
    return i + 1


def body_end(completion: str) -> int | None:
    """Index just after the `}` that closes the function whose `{` ends the prompt."""
    return scan(completion, start_depth=1, stop_depth=0).end


def truncate_body(completion: str) -> str:
    """The completion up to and including the function's closing brace (unchanged if open)."""
    end = body_end(completion)
    return completion if end is None else completion[:end]


def is_self_contained(text: str) -> bool:
    """Balanced braces that never go below zero and no unterminated literal or comment."""
    s = scan(text)
    return s.depth == 0 and s.min_depth >= 0 and s.open_token is None
