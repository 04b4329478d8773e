"""Rust problems in the HumanEval-Rust format (the program a sample compiles to: program.py).

One JSON object per line: `task_id`, `prompt` (doc comment + signature ending in `{`), `test`
(a `#[cfg(test)] mod tests {...}`), `entry_point`, optional `canonical_solution` (the body after
the prompt, closing `}` included) and `category`. MultiPL-E's field names (`name`, `tests`) are
accepted too, as are its tests that close the function themselves and assert in `fn main()`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from sigil_exp.config import SigilError
from sigil_exp.paths import resolve

_FN_NAME = re.compile(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str | None = None
    category: str = "uncategorized"

    def to_json(self) -> dict:
        return asdict(self)


def load_problems(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Read a problems JSONL (`pkg://` paths resolve inside the package); errors name file:line."""
    p = resolve(str(path))
    if not p.is_file():
        raise SigilError(f"Problems file {p} does not exist; set eval.problems to a JSONL file "
                         "(the bundled set is pkg://assets/rust_problems.jsonl).")
    problems: list[Problem] = []
    seen: set[str] = set()
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                raise SigilError(f"{p}:{lineno} is not a valid JSON object ({e}); fix or remove that line.") from None
            prob = _parse(rec, p, lineno)
            if prob.task_id in seen:
                raise SigilError(f"{p}:{lineno} repeats task_id {prob.task_id!r}; task ids must be unique.")
            seen.add(prob.task_id)
            problems.append(prob)
            if limit is not None and len(problems) >= limit:
                break
    if not problems:
        raise SigilError(f"Problems file {p} holds no problems; point eval.problems at a non-empty JSONL file.")
    return problems


def _parse(rec: dict, path: Path, lineno: int) -> Problem:
    task_id = rec.get("task_id", rec.get("name"))
    test = rec.get("test", rec.get("tests"))
    prompt = rec.get("prompt")
    missing = [k for k, v in (("task_id", task_id), ("prompt", prompt), ("test", test)) if not isinstance(v, str) or not v]
    if missing:
        raise SigilError(f"{path}:{lineno} lacks {', '.join(missing)} (a string each); "
                         "every problem needs task_id, prompt, test and entry_point.")
    entry = rec.get("entry_point")
    if not entry:
        names = _FN_NAME.findall(prompt)
        if not names:
            raise SigilError(f"{path}:{lineno} ({task_id}) has no entry_point and its prompt declares no fn; "
                             "add \"entry_point\": \"<function name>\".")
        entry = names[-1]
    canonical = rec.get("canonical_solution")
    return Problem(task_id=str(task_id), prompt=prompt, test=test, entry_point=str(entry),
                   canonical_solution=canonical if isinstance(canonical, str) and canonical else None,
                   category=str(rec.get("category") or "uncategorized"))
