"""Rust source analysis without a Rust parser: blank out comments and literals, strip
`#[cfg(test)]` items, count quality markers.

Everything works on `code_view(src)`: a copy of the source of the same length in which the
contents of comments, string/char/byte literals and raw strings (r#"..."#, any number of `#`)
are replaced by spaces (newlines kept). Braces, `#[cfg(test)]` or `unwrap()` inside a string or
comment therefore never count, and offsets into the view are offsets into the original.
"""

from __future__ import annotations

import re

_CAND = re.compile(r"[/\"']")  # every comment, string, char literal or lifetime starts at one of these
_CHAR = re.compile(r"""'(?:[^'\\\n]|\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F_]{1,8}\}|.))'""", re.S)
_STR_BODY = re.compile(r'(?:[^"\\]|\\.)*"', re.S)
_BLOCK = re.compile(r"/\*|\*/")
_NOT_NL = re.compile(r"[^\n]")


def _is_ident(c: str) -> bool:
    return c.isalnum() or c == "_"


def _blank(s: str) -> str:
    return " " * len(s) if "\n" not in s else _NOT_NL.sub(" ", s)


def _string_start(src: str, lo: int, quote: int) -> tuple[int, int | None]:
    """(start of the literal, number of # for a raw string or None) for the `"` at `quote`,
    looking back (not before `lo`) for an r / br / cr prefix with optional hashes, or b / c."""
    k = quote
    while k > lo and src[k - 1] == "#":
        k -= 1
    hashes = quote - k
    if k > lo and src[k - 1] == "r":
        start = k - 1
        if start > lo and src[start - 1] in "bc":
            start -= 1
        if start == lo or not _is_ident(src[start - 1]):
            return start, hashes
    if hashes == 0 and quote > lo and src[quote - 1] in "bc" and (quote - 1 == lo or not _is_ident(src[quote - 2])):
        return quote - 1, None
    return quote, None


def code_view(src: str, keep_comments: bool = False) -> str:
    """`src` with comment and literal contents replaced by spaces (same length, newlines kept);
    keep_comments=True blanks only the literals."""
    return scan_view(src, keep_comments)[0]


def scan_view(src: str, keep_comments: bool = False) -> tuple[str, bool]:
    """(code_view(src), whether src ends inside an unterminated comment or string literal)."""
    out: list[str] = []
    unterminated = False
    pos = 0
    n = len(src)
    scan = 0  # where to look for the next candidate (a lone `/` or a lifetime is code)
    while True:
        m = _CAND.search(src, scan)
        if m is None:
            break
        j = m.start()
        c = src[j]
        comment = False
        if c == "/":
            nxt = src[j + 1:j + 2]
            if nxt == "/":
                start, comment = j, True
                end = src.find("\n", j)
                end = n if end < 0 else end
            elif nxt == "*":
                start, comment = j, True
                depth, end = 0, n
                unterminated = True
                for b in _BLOCK.finditer(src, j):
                    depth += 1 if b.group(0) == "/*" else -1
                    if depth == 0:
                        end, unterminated = b.end(), False
                        break
            else:
                scan = j + 1
                continue
        elif c == '"':
            start, hashes = _string_start(src, pos, j)
            if hashes is not None:
                closing = '"' + "#" * hashes
                end = src.find(closing, j + 1)
                unterminated = end < 0
                end = n if end < 0 else end + len(closing)
            else:
                body = _STR_BODY.match(src, j + 1)
                unterminated = body is None
                end = body.end() if body else n
        else:  # ' : a char literal (b'x' too) or a lifetime / label
            lit = _CHAR.match(src, j)
            if lit is None:
                scan = j + 1
                continue
            start, end = j, lit.end()
        out.append(src[pos:start])
        out.append(src[start:end] if keep_comments and comment else _blank(src[start:end]))
        pos = scan = end
    out.append(src[pos:])
    return "".join(out), unterminated


# ------------------------------------------------------------------------------ test stripping
# `#[cfg(test)]` and `#[cfg(all(test, ...))]` mark test-only items; `any(test, ...)` does not.
_CFG = re.compile(r"#\s*\[\s*cfg\s*\(")
_INNER_CFG_TEST = re.compile(r"#\s*!\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")
_OPEN, _CLOSE = "([{", ")]}"
_PUNCT = re.compile(r"[()\[\]{};,]")
_ITEM_WORD = re.compile(r"\s*(?:#\s*\[|pub\b|mod\b|fn\b|use\b|impl\b|struct\b|enum\b|trait\b|const\b|static\b|"
                        r"type\b|macro_rules\b|extern\b|unsafe\b|async\b|let\b|union\b)")

_SEMI_ITEM = re.compile(r"(?:\s*#\s*\[[^\]]*\])*\s*(?:pub\s*(?:\([^)]*\))?\s*)?(?:use|const|static|let|type)\b")


def _close_of(view: str, open_pos: int) -> int:
    """Offset just past the bracket that closes the one at `open_pos`."""
    depth = 0
    for m in _PUNCT.finditer(view, open_pos):
        c = m.group(0)
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0:
                return m.end()
    return len(view)


def _top_level_args(text: str) -> list[str]:
    args, depth, cur = [], 0, []
    for c in text:
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        if c == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    args.append("".join(cur).strip())
    return args


def _test_attrs(view: str):
    """(start, end) of every outer attribute that makes an item test-only."""
    for m in _CFG.finditer(view):
        paren = m.end() - 1
        inner_end = _close_of(view, paren)
        inner = view[paren + 1:inner_end - 1].strip()
        close = view.find("]", inner_end)
        if close < 0 or view[inner_end:close].strip():
            continue
        if inner == "test":
            yield m.start(), close + 1
        elif re.match(r"all\s*\(", inner) and inner.endswith(")"):
            if "test" in _top_level_args(inner[inner.index("(") + 1:-1]):
                yield m.start(), close + 1


def _item_end(view: str, pos: int) -> int:
    """End offset of the item after the attribute ending at `pos`: the first `;` at depth 0, or the
    `}` closing the first `{` opened at depth 0. For a field, variant or match arm (no item
    keyword) a `,` at depth 0 ends it too. Further attributes (`#[...]`) are part of the item."""
    is_item = bool(_ITEM_WORD.match(view, pos))
    semicolon_only = bool(_SEMI_ITEM.match(view, pos))  # `use a::{b, c};`, `const X: T = T { .. };`
    depth = 0
    for m in _PUNCT.finditer(view, pos):
        c = m.group(0)
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0 and c == "}" and not semicolon_only:
                return m.end()
            if depth < 0:  # ran out of the enclosing block: stop before its brace
                return m.start()
        elif depth == 0 and (c == ";" or not is_item):
            return m.end()
    return len(view)


def _item_start(src: str, view: str, pos: int) -> int:
    """Walk back from the attribute at `pos` over the item's other outer attributes and its doc
    comments (not over `//!` docs, which belong to the enclosing module)."""
    while True:
        j = pos
        while j > 0 and view[j - 1].isspace():
            j -= 1
        gap = src[j:pos]
        if "//!" in gap or "/*!" in gap:
            break
        if j > 0 and view[j - 1] == "]":
            k = _open_of(view, j - 1)
            h = k - 1
            while h >= 0 and view[h].isspace():
                h -= 1
            if k > 0 and h >= 0 and view[h] == "#":
                pos = h
                continue
        # doc comments and plain comments right above belong to the item
        first = len(gap) - len(gap.lstrip())
        if gap[first:first + 2] in ("//", "/*"):
            pos = j + first
        break
    line_start = view.rfind("\n", 0, pos) + 1
    return line_start if not view[line_start:pos].strip() else pos


def _open_of(view: str, close_pos: int) -> int:
    depth = 0
    for i in range(close_pos, -1, -1):
        c = view[i]
        if c in _CLOSE:
            depth += 1
        elif c in _OPEN:
            depth -= 1
            if depth == 0:
                return i
    return 0


def is_test_only(src: str, view: str | None = None) -> bool:
    """True for a file that is test code as a whole (`#![cfg(test)]`)."""
    return bool(_INNER_CFG_TEST.search(view if view is not None else code_view(src)))


def has_test_items(view: str) -> bool:
    return next(_test_attrs(view), None) is not None


def strip_test_items(src: str, view: str | None = None) -> tuple[str, int]:
    """Remove every test-only item (usually `#[cfg(test)] mod tests { ... }`) with its other
    attributes and doc comments; returns (code, items removed)."""
    view = view if view is not None else code_view(src)
    spans: list[tuple[int, int]] = []
    for a_start, a_end in _test_attrs(view):
        if spans and a_start < spans[-1][1]:  # inside an item already removed
            continue
        end = _item_end(view, a_end)
        nl = view.find("\n", end)  # take the rest of the line if it is blank
        if nl >= 0 and not view[end:nl].strip():
            end = nl + 1
        start = _item_start(src, view, a_start)
        if spans and start < spans[-1][1]:
            start = spans[-1][1]
        spans.append((start, end))
    if not spans:
        return src, 0
    parts, prev = [], 0
    for s, e in spans:
        parts.append(src[prev:s])
        prev = e
    parts.append(src[prev:])
    return "".join(parts), len(spans)


# ----------------------------------------------------------------------------- quality markers
# Counted in the code view (not inside strings/comments), occurrences not presence. A pattern
# in WORD_START counts only where no identifier character precedes it (`impl`, not `my_impl`);
# patterns start with a literal so the regex engine can skip ahead (a leading \b is 40x slower).
IDIOMATIC = {
    "try_operator": re.compile(r"\?(?=[\s.;,)\]}])"),
    "iterator_adapter": re.compile(
        r"\.(?:iter|into_iter|iter_mut|map|filter|filter_map|flat_map|fold|collect|zip|enumerate|chain|take|"
        r"skip|any|all|find|find_map|sum|rev|windows|chunks|and_then|map_err|ok_or|ok_or_else|unwrap_or|"
        r"unwrap_or_else|unwrap_or_default)\s*[(:]"
    ),
    "impl_block": re.compile(r"impl\b"),
    "match": re.compile(r"match\b"),
    "result_option": re.compile(r"(?:Result|Option)\s*<"),
    "derive": re.compile(r"#\s*\[\s*derive\s*\("),
}
LOW_QUALITY_CODE = {
    "unwrap": re.compile(r"\.unwrap\s*\(\s*\)"),
    "unsafe": re.compile(r"unsafe\b"),
    "allow_attr": re.compile(r"#\s*!?\s*\[\s*allow\s*\("),
    "debug_print": re.compile(r"(?:e?print(?:ln)?|dbg)!"),
    "placeholder": re.compile(r"(?:todo|unimplemented)!"),
}
# Counted in comments (literals blanked): that is where they live.
LOW_QUALITY_TEXT = {"todo_comment": re.compile(r"(?:TODO|FIXME|XXX|HACK)\b")}
WORD_START = {"impl_block", "match", "result_option", "unsafe", "debug_print", "placeholder", "todo_comment"}


def _count(name: str, pattern: re.Pattern, text: str) -> int:
    if name not in WORD_START:
        return len(pattern.findall(text))
    return sum(1 for m in pattern.finditer(text) if m.start() == 0 or not _is_ident(text[m.start() - 1]))


_DOC = re.compile(r"^[ \t]*(?:///|//!|/\*\*[^*/]|/\*!)", re.M)
GENERATED = re.compile(
    r"@generated|do not edit|automatically generated|auto-?generated|"
    r"^[\s!*]*(?:this (?:file|code|module) (?:is|was|has been) )?generated (?:by|from|with|using)\b", re.I)


def marker_counts(src: str, view: str) -> tuple[int, int]:
    """(idiomatic marker occurrences, low-quality marker occurrences)."""
    good = sum(_count(k, p, view) for k, p in IDIOMATIC.items())
    bad = sum(_count(k, p, view) for k, p in LOW_QUALITY_CODE.items())
    comments = code_view(src, keep_comments=True)
    bad += sum(_count(k, p, comments) for k, p in LOW_QUALITY_TEXT.items())
    return good, bad


def idiomatic_ratio(src: str, view: str | None = None) -> float:
    """Idiomatic markers per low-quality marker (a file with no low-quality marker scores its
    idiomatic count, so trivial files with neither score 0)."""
    good, bad = marker_counts(src, view if view is not None else code_view(src))
    return good / max(bad, 1)


def doc_comment_count(src: str) -> int:
    return len(_DOC.findall(src))


def has_doc_comment(src: str) -> bool:
    return _DOC.search(src) is not None


_BANNER_LINE = re.compile(r"^[ \t]*(?://(?![/!])|/\*(?![*!])|\*)(.*)$", re.M)


def looks_generated(src: str) -> bool:
    """A generator's banner (`@generated`, `DO NOT EDIT`, `generated by`, ...) in a plain (not
    doc) comment among the first 15 lines; `/// values generated by this macro` does not count."""
    head = "\n".join(src.split("\n", 15)[:15])
    return any(GENERATED.search(m.group(1)) for m in _BANNER_LINE.finditer(head))
