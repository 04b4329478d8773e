"""The program a sample compiles to, what a pass must print, and whether it may share a crate.

Every sample's program holds the problem's tests, hardened, and one more test, the sentinel:

- std macros in the tests (`assert_eq!`, `vec!`, ...) are called through a crate alias that no
  sample can name (`::sigil_std_<nonce>::assert_eq!`, declared at the crate root by us), so a
  sample's own `macro_rules! assert_eq`, or `extern crate self as core`, cannot reach them;
- MultiPL-E tests (asserts in `fn main()`) become `#[test] fn main()`: every sample runs under
  libtest and is judged by the same rule;
- the sentinel `ωsigil_<nonce>` sorts after every other test name of the sample (libtest runs
  tests one at a time in name order with `--test-threads=1`), so libtest announces it only
  after the problem's tests have finished, and a sample cannot print it beforehand without the
  nonce. A pass (see verdict.py) needs libtest's own summary, the sentinel and every expected
  test name in the output.

Two forms:

- module form (batch-safe samples): `mod sigil_s00017 { prompt + completion + tests + sentinel }`
  with `crate::` / `$crate::` paths rewritten to `crate::sigil_s00017::`. The text is the same
  whether the crate holds this one module (alone) or 32 of them (batched), and the test binary
  gets the same arguments (`--test-threads=1 sigil_s00017::`): batching only adds crate-mates.
- root form (`batch_safe` says no): the sample at the crate root, alone in its crate.

`batch_safe` is conservative (a mention in a comment is enough to refuse): anything that acts
on the whole binary (`global_asm!`/`asm!` constructors, `#[link_section]`, `#[no_mangle]`/
`#[export_name]` symbols, `extern` blocks and crates, allocators, panic handlers), anything that
behaves differently inside a module (inner attributes, `super::`, `line!`, `type_name`, panic
locations, `crate` used other than as a path start), lint levels (`deny`/`forbid`), file
inclusion, the harness's own names (`sigil_`), and delimiters that are unbalanced (they would
reach into a crate-mate) or nested deeper than MAX_NESTING (a known way to crash rustc).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from sigil_exp.data.rust import code_view
from sigil_exp.evaluate.rust_lex import nesting_depth

MODULE = "sigil_s{:05d}"
SENTINEL = "\u03c9sigil_"  # 'ω' sorts after every ASCII name
MAX_NESTING = 64  # deeper delimiter nesting can overflow rustc's stack: compiled alone, not in a crate
_UNSAFE = re.compile(r"""
      \#\s*!\s*\[                                   # inner attributes: crate/module level
    | \bsuper\b | \bpub\s*\(\s*in\b                 # paths relative to the enclosing module
    | \bextern\b                                    # extern blocks, extern crates, foreign ABIs
    | asm\s*!                                       # asm!, global_asm!, naked_asm!: raw symbols, constructors
    | \bnaked\b | link_section | no_mangle | export_name | link_name | \blinkage\b
    | global_allocator | panic_handler | alloc_error_handler | \bmacro_(?:export|use)\b
    | \binclude(?:_str|_bytes)?\s*! | \#\s*\[\s*path\b
    | \b(?:line|column|file|module_path)\s*! | type_name | (?i:\blocation\b) | track_caller | (?i:backtrace)
    | \#\s*\[\s*(?:deny|forbid)\b
    | sigil_
""", re.X)
_CRATE = re.compile(r"(\$?)\bcrate\b")
_PUB_CRATE = re.compile(r"pub\s*\(\s*$")
_STD_MACROS = ("assert", "assert_eq", "assert_ne", "debug_assert", "debug_assert_eq", "debug_assert_ne", "panic",
               "unreachable", "unimplemented", "todo", "vec", "format", "matches", "print", "println", "eprint",
               "eprintln", "write", "writeln", "dbg", "concat", "stringify")
_MACRO_CALL = re.compile(r"(?<![\w$:])((?:::\s*)?(?:std|core)\s*::\s*)?\b(" + "|".join(_STD_MACROS) + r")\s*!")
_TEST_ITEMS = re.compile(r"\bmod\s+(?:r#)?([^\W\d]\w*)\s*\{|[{}]|#\s*\[\s*test\s*\]")
_TEST_FN = re.compile(r"((?:\s*#\s*\[[^\]]*\])*)\s*(?:pub\s*(?:\([^)]*\))?\s*)?(?:(?:async|unsafe|const)\s+)*"
                      r"fn\s+(?:r#)?([^\W\d]\w*)")
_MAIN = re.compile(r"\bfn\s+main\s*\(")


@dataclass(frozen=True)
class Program:
    text: str  # the file (root form) or the module (module form)
    module: str | None  # module form: the sample's module; libtest filter `<module>::`
    expected: tuple[str, ...]  # full libtest names of the problem's tests
    sentinel: str  # full libtest name of the sentinel test

    @property
    def filter(self) -> str | None:
        return f"{self.module}::" if self.module else None


def new_std_alias() -> str:
    """The crate alias for std that the tests use (one per execute() call; see crate_footer)."""
    return f"sigil_std_{secrets.token_hex(8)}"


def crate_footer(std_alias: str) -> str:
    return f"extern crate std as {std_alias};\n"


def uses_test_harness(test: str) -> bool:
    """HumanEval-Rust tests are `#[test]` functions; MultiPL-E's assert in `fn main()`."""
    return "#[test]" in test


def joined_source(prompt: str, completion: str, test: str) -> str:
    """prompt + completion + tests, as the problem states them (MultiPL-E tests close the function)."""
    body = completion
    if test.lstrip().startswith("}"):  # MultiPL-E: the tests close the function themselves
        stripped = body.rstrip()
        if stripped.endswith("}"):
            body = stripped[:-1]
    return f"{prompt}{body}\n\n{test.strip()}\n"


def batch_safe(prompt: str, completion: str, test: str) -> bool:
    """Whether the sample can share a crate without changing its own or anyone else's verdict."""
    own = prompt + completion
    if _UNSAFE.search(own) or "sigil_" in test:
        return False
    src = joined_source(prompt, completion, test)
    depth = nesting_depth(src)
    return depth is not None and depth <= MAX_NESTING and _crate_paths(src) is not None


def _crate_paths(src: str) -> list[int] | None:
    """Offsets just after each `crate::` / `$crate::` in code (to insert the module there), or
    None when `crate` is used any other way (`use crate as x`, `extern crate`, ...)."""
    view = code_view(src)
    out = []
    for m in _CRATE.finditer(view):
        rest = re.match(r"\s*::", view[m.end():])
        if rest:
            out.append(m.end() + rest.end())
        elif not (m.group(1) == "" and _PUB_CRATE.search(view[max(0, m.start() - 16):m.start()])
                  and re.match(r"\s*\)", view[m.end():])):
            return None
    return out


def harden_tests(test: str, std_alias: str) -> str:
    """The problem's tests with std macros called through `::<std_alias>::` and, for MultiPL-E
    tests, `fn main()` turned into a test."""
    view = code_view(test)
    parts, pos = [], 0
    for m in _MACRO_CALL.finditer(view):
        parts += [test[pos:m.start()], f"::{std_alias}::{m.group(2)}!"]
        pos = m.end()
    parts.append(test[pos:])
    out = "".join(parts)
    if not uses_test_harness(out):
        main = _MAIN.search(code_view(out))
        if main:
            out = f"{out[:main.start()]}#[test] {out[main.start():]}"
    return out


def libtest_names(test: str) -> list[str]:
    """libtest names (`tests::test_add`) of the `#[test]` functions in `test` that libtest will
    run (not `#[ignore]`d), derived from the source: module nesting and function names."""
    view = code_view(test)
    names, stack, depth = [], [], 0
    for m in _TEST_ITEMS.finditer(view):
        tok = m.group(0)
        if m.group(1):
            stack.append((m.group(1), depth))
            depth += 1
        elif tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if stack and stack[-1][1] == depth:
                stack.pop()
        else:
            fn = _TEST_FN.match(view, m.end())
            if fn and not re.search(r"\bignore\b", fn.group(1)):
                names.append("::".join([n for n, _ in stack] + [fn.group(2)]))
    return names


def _sentinel_name(src: str) -> str:
    """A test name after every name the sample's tests can have: `ωsigil_<nonce>`, or, if some
    identifier starts with a character from 'ω' up, that identifier + `ωsigil_<nonce>`."""
    top = max((w for w in re.findall(r"[^\W\d]\w*", code_view(src)) if w[0] >= SENTINEL[0]), default="")
    return f"{top}{SENTINEL}{secrets.token_hex(8)}"


def build_program(prompt: str, completion: str, test: str, std_alias: str, module: str | None) -> Program:
    """The sample's program in module form (`module` given; the sample must be batch_safe) or
    root form (None). Module-form texts need crate_footer(std_alias) once per crate; root-form
    texts include it."""
    tests = harden_tests(test, std_alias)
    expected = libtest_names(tests)
    joined = joined_source(prompt, completion, tests)
    sentinel = _sentinel_name(joined)
    src = f"{joined}\n#[cfg(test)]\n#[test]\nfn {sentinel}() {{}}\n"
    if module is None:
        return Program(src + crate_footer(std_alias), None, tuple(expected), sentinel)
    offsets = _crate_paths(src)
    assert offsets is not None, "build_program(module=...) needs a batch_safe sample"
    pieces, pos = [], 0
    for off in offsets:
        pieces += [src[pos:off], f"{module}::"]
        pos = off
    pieces.append(src[pos:])
    text = f"mod {module} {{\n{''.join(pieces)}}}\n"
    return Program(text, module, tuple(f"{module}::{n}" for n in expected), f"{module}::{sentinel}")
