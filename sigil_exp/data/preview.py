"""See what the model sees: the first N processed sequences of a run's data, decoded, with the
trained tokens marked, each with where it came from, then the data stats table.

    python -m sigil_exp.data.preview experiment=smoke --n 3
    python -m sigil_exp.data.preview data=phase2 data.sources.1.path=~/.cargo/registry/src --split eval
    python -m sigil_exp.data.preview experiment=smoke --n 2 | less -R

The overrides are a run's (`python -m sigil_exp [overrides]`): the same Hydra config is composed,
the run's tokenizer loaded, and the datasets built by the same `build_datasets` call (so a run
with the same config reuses the cache entry this fills, and the other way round). On a terminal
the prompt and other untrained tokens are dimmed and the trained tokens (those with a loss) shown
bright; elsewhere (a pipe, a file, NO_COLOR set) the trained spans are wrapped in ⟦ ⟧, brackets
that Rust code does not use. A sequence's first token is never trained: nothing predicts it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from sigil_exp.config import SigilError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
OPEN, CLOSE = "⟦", "⟧"
DIM, BRIGHT, RESET = "\x1b[2m", "\x1b[1;32m", "\x1b[0m"


def trained_runs(ids: list[int], mask: list[int]) -> list[tuple[list[int], bool]]:
    """The sequence cut into runs of (token ids, trained); trained = in the loss and not first."""
    runs: list[tuple[list[int], bool]] = []
    for i, (t, m) in enumerate(zip(ids, mask, strict=True)):
        trained = bool(m) and i > 0
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(t)
        else:
            runs.append(([t], trained))
    return runs


def render(ids: list[int], mask: list[int], tokenizer: Any, color: bool) -> str:
    out = []
    for run, trained in trained_runs(ids, mask):
        text = tokenizer.decode(run, skip_special_tokens=False)
        if color:
            out.append((BRIGHT if trained else DIM) + text + RESET)
        else:
            out.append(OPEN + text + CLOSE if trained else text)
    return "".join(out)


def stats_table(stats: dict[str, Any]) -> str:
    width = max(map(len, stats), default=0)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in sorted(stats.items()))


def load(overrides: list[str]):
    """(typed RunConfig, tokenizer) exactly as a run composes and loads them."""
    from hydra import compose, initialize_config_dir
    from omegaconf.errors import MissingMandatoryValue

    from sigil_exp import model as modeling  # the run's tokenizer loading (builds the tiny model if needed)
    from sigil_exp.config import to_object
    from sigil_exp.validation import validate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose(config_name="config", overrides=overrides)
    try:
        cfg = to_object(composed)
    except MissingMandatoryValue as e:
        raise SigilError(f"{e.full_key} is required but not set (???); add `{e.full_key}=<value>` to the command.") from None
    validate(cfg)
    return cfg, modeling.load_tokenizer(cfg.model, modeling.resolve_model_path(cfg.model))


def preview(overrides: list[str], n: int, split: str, color: bool) -> str:
    from sigil_exp.data import build_datasets

    cfg, tokenizer = load(overrides)
    bundle = build_datasets(cfg.data, tokenizer, cfg.model.max_seq_len, cfg.train.seed, cfg.cache_dir)
    ds = bundle.train if split == "train" else bundle.eval
    if ds is None:
        raise SigilError(f"data={cfg.data.name} has no eval split (data.val_fraction={cfg.data.val_fraction}); "
                         f"use --split train or raise data.val_fraction.")
    origins = bundle.origins.get(split)
    lines = [f"{split}: {len(ds)} sequences of data={cfg.data.name} (format {cfg.data.format}, "
             f"max_seq_len {cfg.model.max_seq_len}, tokenizer {tokenizer.name_or_path})"]
    for i in range(min(n, len(ds))):
        row = ds[i]
        ids, mask = row["input_ids"], row["completion_mask"]
        where = origins[i]["origin"] if origins is not None else "?"
        trained = sum(mask[1:])
        lines.append(f"\n=== {split}[{i}]  {where}  ({len(ids)} tokens, {trained} trained) ===")
        lines.append(render(ids, mask, tokenizer, color))
    lines.append("\n=== data stats ===")
    lines.append(stats_table(bundle.stats))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sigil_exp.data.preview", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for `python -m sigil_exp` (e.g. experiment=smoke)")
    ap.add_argument("--n", type=int, default=3, help="sequences to show (default 3)")
    ap.add_argument("--split", choices=("train", "eval"), default="train")
    ap.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                    help="auto = colour on a terminal unless NO_COLOR is set; brackets otherwise")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        print(preview(args.overrides, args.n, args.split, color))
    except (SigilError, HydraException, OmegaConfBaseException) as e:  # bad overrides or data: one sentence
        print(f"Error: {str(e).strip()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
