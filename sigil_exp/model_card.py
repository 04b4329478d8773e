"""The model card (README.md) of an export, written from the run folder: base model and revision,
the resolved LoRA / quantisation / data config, data statistics, training figures, the Rust
evaluation results if any, and the command that reproduces the run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from sigil_exp.artifacts import Artifact
from sigil_exp.config import RunConfig


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "—" if v is None else str(v)


def _table(rows: list[tuple[str, Any]]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows) + "\n"


def run_overrides(run: Path | None) -> list[str] | None:
    """The command-line overrides of the run (Hydra's .hydra/overrides.yaml, else metrics.json)."""
    if run is None:
        return None
    hydra = run / ".hydra" / "overrides.yaml"
    if hydra.is_file():
        from omegaconf import OmegaConf

        return [str(o) for o in OmegaConf.load(hydra)]
    overrides = _read_json(run / "metrics.json").get("overrides")
    return list(overrides) if isinstance(overrides, list) else None


def model_card(art: Artifact, cfg: RunConfig, meta: dict[str, Any]) -> str:
    run = art.run
    metrics = _read_json(run / "metrics.json") if run else {}
    stats = _read_json(run / "data_stats.json").get("stats", {}) if run else {}
    ev = _read_json(run / "eval" / "metrics.json") if run else {}
    m, lo, q, d, hw, tr = cfg.model, cfg.lora, cfg.quant, cfg.data, cfg.hardware, cfg.train
    hub_base = not Path(m.name_or_path).expanduser().is_absolute() and m.name_or_path.count("/") == 1 and m.build_tiny is None
    name = metrics.get("name") or (run.name if run else "export")
    overrides = run_overrides(run)
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [sigil_exp, lora, qlora, merged, rust, code]"]
    if hub_base:
        front.append(f"base_model: {m.name_or_path}")
    front.append("---")
    lines = [*front, "", f"# {name}: {m.name} + LoRA, merged", "",
             f"A Rust fine-tune of `{m.name_or_path}` made with sigil_exp (QLoRA: {q.method} base, LoRA r={lo.r}), "
             f"its adapter merged into the base ({meta['merge_base']}) and saved as a plain {meta['dtype']} "
             "transformers checkpoint. No peft or sigil_exp is needed to use it.", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(\"<this folder or repo>\")",
              "tokenizer = AutoTokenizer.from_pretrained(\"<this folder or repo>\")", "```", ""]
    if d.format == "chat":
        lines.append("Prompt format (trained with `data.format=chat`): the tokenizer's chat template, one user turn.")
    else:
        lines += [f"Prompt format (trained with `data.format={d.format}`): BOS + the prompt (a Rust doc comment and "
                  "signature) + one newline; the model continues with the function body and stops after its closing "
                  "brace (cut there) or at EOS:", "", "```python",
                  "ids = [tokenizer.bos_token_id] + tokenizer(prompt.rstrip(\"\\n\") + \"\\n\", add_special_tokens=False).input_ids",
                  "```"]
    lines += ["", "## Base model and merge", "", _table([
        ("base model", m.name_or_path), ("revision", m.revision), ("merge base", meta["merge_base"]),
        ("saved dtype", meta["dtype"]), ("layers merged / NF4-roundtripped", f"{meta['merged_layers']} / {meta['roundtripped_layers']}"),
        ("adapter", meta["adapter"]), ("adapter sha256", meta["adapter_sha256"][:16] + "…")])]
    if meta["merge_base"] == "nf4_roundtrip":
        lines.append("`nf4_roundtrip`: the base weights were quantised and dequantised with the run's own NF4 settings "
                     "before merging, so the model computes what training saw (up to bf16 rounding).\n")
    lines += ["## LoRA and quantisation", "", _table([
        ("r / alpha / dropout", f"{lo.r} / {_fmt(lo.alpha)} / {lo.dropout}"), ("target modules", ", ".join(lo.target_modules)),
        ("rsLoRA / DoRA", f"{lo.use_rslora} / {lo.use_dora}"), ("init", lo.init_weights),
        ("quantisation", f"{q.method}, double quant {q.double_quant}, compute {q.compute_dtype}")])]
    sources = ", ".join(f"{s.kind}:{s.path} (x{s.weight:g})" for s in d.sources)
    lines += ["## Data", "", _table([
        ("sources", sources), ("format", d.format), ("dedup", d.filters.dedup), ("val fraction", d.val_fraction),
        ("records kept / seen", f"{_fmt(stats.get('records_kept'))} / {_fmt(stats.get('records_seen'))}"),
        ("train examples / tokens", f"{_fmt(stats.get('train_examples'))} / {_fmt(stats.get('train_tokens'))}"),
        ("max sequence length", m.max_seq_len)])]
    lines += ["## Training", "", _table([
        ("hardware preset", hw.name), ("steps", metrics.get("train/steps")), ("tokens", metrics.get("train/tokens")),
        ("train loss first -> final", f"{_fmt(metrics.get('train/loss_first'))} -> {_fmt(metrics.get('train/loss'))}"),
        ("eval loss", metrics.get("eval/loss")), ("tokens/s", metrics.get("train/tokens_per_s")),
        ("peak memory (GB)", metrics.get("sys/peak_mem_gb")), ("train time (s)", metrics.get("time/train_s")),
        ("lr / scheduler / warmup", f"{tr.lr} / {tr.scheduler} / {tr.warmup_ratio}"), ("seed", tr.seed)])]
    em = ev.get("metrics") or {}
    if em:
        ec = ev.get("eval_config", {})
        rows = [(k, v) for k, v in em.items() if k.count("/") == 1 and (k.startswith("eval/pass@") or k == "eval/compile_rate")]
        rows += [("problems", ec.get("problems")), ("samples per problem / temperature",
                                                    f"{ec.get('n_samples')} / {ec.get('temperature')}"),
                 ("sandbox", ev.get("sandbox"))]
        lines += ["## Rust evaluation (the adapter run, before export)", "", _table(rows)]
    lines += ["## Reproduce", "", "```bash"]
    if overrides is not None:
        lines.append("python -m sigil_exp " + " ".join(shlex.quote(o) for o in overrides))
    else:
        lines.append("# overrides unknown (no .hydra/overrides.yaml); the resolved config is resolved_config.yaml")
    lines += [meta["command"], "```", "", "`resolved_config.yaml` here is the run's full resolved config; "
              "`sigil_export.json` records how this export was made.", ""]
    return "\n".join(lines)
