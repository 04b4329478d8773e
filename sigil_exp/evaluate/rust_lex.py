"""Brace depth of generated Rust, outside literals and comments.

Built on the project's one Rust lexer, `sigil_exp.data.rust.scan_view` (comments, nested block
comments, strings with escapes, byte/C strings, raw strings `r#"..."#`, char literals told apart
from lifetimes and labels): finds where a function body ends and whether a snippet is
self-contained (every delimiter closed in order).
"""

from __future__ import annotations

from dataclasses import dataclass

from sigil_exp.data.rust import scan_view


@dataclass(frozen=True)
class Scan:
    depth: int  # brace depth at the end, relative to the start
    min_depth: int  # lowest depth reached (negative: a `}` closed something opened before)
    end: int | None  # index just after the `}` that brought the depth to `stop_depth`, if any
    unterminated: bool  # the text ends inside a string literal or block comment


def scan(text: str, start_depth: int = 0, stop_depth: int | None = None) -> Scan:
    """Track `{`/`}` over `text`; stop at the first `}` that brings the depth to `stop_depth`."""
    view, unterminated = scan_view(text)
    depth = mind = start_depth
    for i, c in enumerate(view):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            mind = min(mind, depth)
            if stop_depth is not None and depth == stop_depth:
                return Scan(depth, mind, i + 1, False)
    return Scan(depth, mind, None, unterminated)


def body_end(completion: str) -> int | None:
    """Index just after the `}` that closes the function whose `{` ends the prompt."""
    return scan(completion, start_depth=1, stop_depth=0).end


def truncate_body(completion: str) -> str:
    """The completion up to and including the function's closing brace (unchanged if open)."""
    end = body_end(completion)
    return completion if end is None else completion[:end]


_PAIRS = {")": "(", "]": "[", "}": "{"}


def nesting_depth(text: str) -> int | None:
    """The deepest nesting of `(`, `[` and `{` in `text`, or None unless every one is closed, in
    order, inside `text` with no unterminated literal or comment (then rustc's token trees
    cannot reach across its ends, into a crate-mate)."""
    view, unterminated = scan_view(text)
    if unterminated:
        return None
    stack: list[str] = []
    deepest = 0
    for c in view:
        if c in "([{":
            stack.append(c)
            deepest = max(deepest, len(stack))
        elif c in _PAIRS:
            if not stack or stack.pop() != _PAIRS[c]:
                return None
    return None if stack else deepest


def is_self_contained(text: str) -> bool:
    """Every delimiter closed in order inside `text` (see nesting_depth)."""
    return nesting_depth(text) is not None
