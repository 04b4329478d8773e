"""The sweep report's plots: loss curves of every job, and the objective against each swept key."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sigil_exp.report import Job


def _as_number(v: str) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _tex_safe(s: str) -> str:
    return s.replace("$", r"\$")  # matplotlib reads $...$ as math: alpha='${lora.r}' must print as typed


def safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", key)


def plot_loss_curves(jobs: list[Job], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    for i, j in enumerate(jobs):
        color = f"C{i % 10}"
        train = [(r["train/global_step"], r["train/loss"]) for r in j.history
                 if isinstance(r.get("train/loss"), int | float) and "train/global_step" in r]
        evals = [(r["train/global_step"], r["eval/loss"]) for r in j.history
                 if isinstance(r.get("eval/loss"), int | float) and "train/global_step" in r]
        label = _tex_safe(f"{j.num}: {j.label}" + ("" if j.status == "ok" else f" ({j.status})"))
        if train:
            ax.plot(*zip(*train, strict=True), color=color, label=label, linestyle="-" if j.status == "ok" else ":", marker=".")
            drawn = True
        if evals:
            ax.plot(*zip(*evals, strict=True), color=color, marker="o", linestyle="--", label=None if train else label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("train loss (lines) and eval loss (o) per job")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_objective_vs(jobs: list[Job], key: str, facts: dict[str, Any], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(j.value(key), j.objective) for j in jobs if j.objective is not None]
    nums = [j.num for j in jobs if j.objective is not None]
    if not pts:
        return None
    numbers = [_as_number(v) for v, _ in pts]
    fig, ax = plt.subplots(figsize=(6, 4))
    if all(x is not None for x in numbers):
        xs = numbers
        if min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
    else:  # categorical: attn / mlp / all, or alpha='${lora.r}'
        cats = list(dict.fromkeys(v for v, _ in pts))
        xs = [cats.index(v) for v, _ in pts]
        ax.set_xticks(range(len(cats)), [_tex_safe(c) for c in cats], rotation=20, fontsize=8)
        ax.set_xlim(-0.5, len(cats) - 0.5)
    ys = [y for _, y in pts]
    ax.scatter(xs, ys)
    for x, y, n in zip(xs, ys, nums, strict=True):  # which job each point is (report.md's `job` column)
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    failed = [j for j in jobs if j.objective is None and key in j.overrides]
    if failed:
        ax.set_title(f"{len(failed)} failed job(s) not shown", fontsize=8)
    ax.set_xlabel(_tex_safe(key))
    ax.set_ylabel(f"{facts['objective']} ({'lower' if facts['direction'] == 'minimize' else 'higher'} is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
