"""Path resolution shared by every stage: `pkg://` names a file shipped inside the package."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def resolve(path: str) -> Path:
    """`pkg://assets/x.jsonl` -> the bundled file; `~` is expanded; anything else as given."""
    if path.startswith("pkg://"):
        return PACKAGE_DIR / path[len("pkg://"):]
    return Path(path).expanduser()
