"""Rust source analysis without a Rust parser: blank out comments and literals, count quality
markers (test code is found and removed by strip.py on the same view).

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
