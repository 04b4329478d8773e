"""Find and remove Rust test code without a Rust parser, on `rust.code_view(src)` (comments and
literals blanked, same length), so braces or attributes inside strings and comments never count.

Test code is:
  - an item, field, variant, statement or match arm under `#[cfg(test)]` or `#[cfg(all(test, ..))]`
    (`#[cfg(any(test, ..))]` is shared code and stays);
  - a function under a test-harness attribute: `#[test]`, `#[tokio::test]` (any `path::test`),
    `#[rstest]`, `#[test_case(..)]`, `#[quickcheck]`, `#[proptest]`, `#[wasm_bindgen_test]`,
    `#[bench]`, also outside a `cfg(test)` module;
  - a module whose body starts with `#![cfg(test)]`; a file that does is test code as a whole.

Removal takes the whole construct and nothing after it: an item ends at its `;` or at the `}`
closing its body (`const fn` has a body, `const X: T = T { .. };` ends at the `;`); a field,
variant, argument or arm ends at its `,` (generic `<..>` in a field's type kept together) or at
the bracket closing its list. Doc comments and the construct's other attributes go with it.
"""

from __future__ import annotations

import re

from sigil_exp.data.rust import code_view

_CFG = re.compile(r"#\s*\[\s*cfg\s*\(")
_INNER_CFG_TEST = re.compile(r"#\s*!\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")
_HARNESS = re.compile(r"#\s*\[\s*(?:[A-Za-z_]\w*\s*::\s*)*(?:test|rstest|test_case|quickcheck|proptest|"
                      r"wasm_bindgen_test|bench)\s*[(\]]")
_OPEN, _CLOSE = "([{", ")]}"
_PUNCT = re.compile(r"[()\[\]{};,]")
_PUNCT_ANGLE = re.compile(r"[()\[\]{};,<>]")
_VIS = r"(?:pub\s*(?:\([^)]*\))?\s*)?"
_ITEM = re.compile(_VIS + r"(?:mod|fn|use|impl|struct|enum|trait|const|static|type|macro_rules|extern|unsafe|"
                   r"async|let|union|default|auto)\b")
# items that end at their `;` even when braces come first (`use a::{b, c};`, `const X: T = T { .. };`)
_SEMI_ITEM = re.compile(_VIS + r"(?:use|static|let|type|const(?!\s+(?:fn|unsafe|async|extern)\b))\b")
_MOD_HEAD = re.compile(_VIS + r"mod\s+(?:r#)?\w+\s*$")
_FIELD = re.compile(_VIS + r"(?:r#)?[A-Za-z_]\w*\s*:(?!:)")  # `pub name: T` (a field or parameter)


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


def _enclosing_open(view: str, pos: int) -> int:
    """Offset of the unclosed bracket that `pos` lies in, or -1 at file level."""
    depth = 0
    for i in range(pos - 1, -1, -1):
        c = view[i]
        if c in _CLOSE:
            depth += 1
        elif c in _OPEN:
            if depth == 0:
                return i
            depth -= 1
    return -1


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


def _test_attrs(view: str, harness: bool = True):
    """(start, end) of every outer attribute that makes what follows test-only (`harness=False`:
    only the cfg(test) ones)."""
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
    for m in _HARNESS.finditer(view) if harness else ():
        yield m.start(), _close_of(view, view.index("[", m.start()))


def _skip_attrs(view: str, pos: int) -> int:
    """Offset of the first token after the outer attributes (and whitespace) at `pos`."""
    n = len(view)
    while True:
        while pos < n and view[pos].isspace():
            pos += 1
        if not view.startswith("#", pos):
            return pos
        j = pos + 1
        while j < n and view[j].isspace():
            j += 1
        if j >= n or view[j] != "[":
            return pos
        pos = _close_of(view, j)


def _list_element_end(view: str, pos: int) -> int:
    """End of a field, variant, argument or arm at `pos`: past its `,` at depth 0, or at the
    bracket that closes the enclosing list. `<..>` count as brackets (a field's type
    `HashMap<K, V>`) unless that leaves them unbalanced (`a < b` in an expression)."""
    plain = angled = None
    for punct, slot in ((_PUNCT, "plain"), (_PUNCT_ANGLE, "angled")):
        depth = angles = 0
        end = len(view)
        for m in punct.finditer(view, pos):
            c, i = m.group(0), m.start()
            if c == "<":
                angles += 1
            elif c == ">":
                if view[i - 1] not in "-=":  # `->` and `=>` are not brackets
                    angles -= 1
            elif c in _OPEN:
                depth += 1
            elif c in _CLOSE:
                depth -= 1
                if depth < 0:  # the end of the list: stop before its bracket
                    end = i
                    break
                if depth == 0 and c == "}" and angles == 0:  # `Variant { .. }` / `X => { .. }`: a comma may follow
                    k = m.end()
                    while k < len(view) and view[k].isspace():
                        k += 1
                    if view.startswith(("=>", ".", "?"), k):  # `S { x } => ..`, `S { .. }.f()`: not the end yet
                        continue
                    end = k + 1 if view.startswith(",", k) else m.end()
                    break
            elif depth == 0 and angles <= 0 and c in ";,":
                end = m.end()
                break
        if slot == "plain":
            plain = end
        elif angles == 0:
            angled = end
    return angled if angled is not None else plain  # type: ignore[return-value]


def _item_end(view: str, pos: int) -> int:
    """End offset of what follows the attribute ending at `pos`: an item ends at its first `;`
    at depth 0 or at the `}` closing its first `{` at depth 0 (`;` only for use/const/static/
    type/let); anything else (field, variant, statement, argument, arm) is a list element."""
    head = _skip_attrs(view, pos)
    if _FIELD.match(view, head) or not _ITEM.match(view, head):
        return _list_element_end(view, head)
    semicolon_only = bool(_SEMI_ITEM.match(view, head))
    depth = 0
    for m in _PUNCT.finditer(view, head):
        c = m.group(0)
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0 and c == "}" and not semicolon_only:
                return m.end()
            if depth < 0:  # ran out of the enclosing block: stop before its brace
                return m.start()
        elif depth == 0 and c == ";":
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


def _with_blank_rest(view: str, end: int) -> int:
    nl = view.find("\n", end)  # take the rest of the line if it is blank
    return nl + 1 if nl >= 0 and not view[end:nl].strip() else end


def _spans(src: str, view: str, harness: bool = True) -> list[tuple[int, int]]:
    """Sorted, non-overlapping (start, end) of every test-only construct (`harness=False`: of the
    cfg(test) ones)."""
    found = []
    for a_start, a_end in _test_attrs(view, harness):
        found.append((_item_start(src, view, a_start), _with_blank_rest(view, _item_end(view, a_end))))
    for m in _INNER_CFG_TEST.finditer(view):  # `mod tests { #![cfg(test)] .. }`
        open_pos = _enclosing_open(view, m.start())
        if open_pos < 0 or view[open_pos] != "{":
            continue
        head = _MOD_HEAD.search(view, 0, open_pos)
        if head is not None:
            found.append((_item_start(src, view, head.start()), _with_blank_rest(view, _close_of(view, open_pos))))
    spans: list[tuple[int, int]] = []
    for start, end in sorted(found):
        if spans and end <= spans[-1][1]:  # inside a construct already removed
            continue
        if spans and start < spans[-1][1]:
            start = spans[-1][1]
        spans.append((start, end))
    return spans


def is_test_only(src: str, view: str | None = None) -> bool:
    """True for a file that is test code as a whole (`#![cfg(test)]` at file level)."""
    view = view if view is not None else code_view(src)
    return any(_enclosing_open(view, m.start()) < 0 for m in _INNER_CFG_TEST.finditer(view))


def has_test_code(view: str) -> bool:
    """Any test attribute: `#[cfg(test)]`, `#[test]`-style harness attributes, `#![cfg(test)]`."""
    return next(_test_attrs(view), None) is not None or _INNER_CFG_TEST.search(view) is not None


def has_bare_test_fns(src: str, view: str) -> bool:
    """A `#[test]`-style function outside any cfg(test) item: the mark of a test file (`tests/x.rs`,
    `foo_test.rs`), as opposed to library code that carries a `#[cfg(test)] mod tests`."""
    harness = [m.start() for m in _HARNESS.finditer(view)]
    if not harness:
        return False
    cfg_spans = _spans(src, view, harness=False)
    return any(not any(s <= h < e for s, e in cfg_spans) for h in harness)


def strip_test_items(src: str, view: str | None = None) -> tuple[str, int]:
    """Remove every test-only construct with its attributes and doc comments; returns (code,
    constructs removed). A file that is test-only as a whole is the caller's to drop."""
    view = view if view is not None else code_view(src)
    spans = _spans(src, view)
    if not spans:
        return src, 0
    parts, prev = [], 0
    for s, e in spans:
        parts.append(src[prev:s])
        prev = e
    parts.append(src[prev:])
    return "".join(parts), len(spans)
