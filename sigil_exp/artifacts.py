"""What a run leaves behind, found and checked in one place: a run folder, its adapter/ folder, or
an export (a merged checkpoint from `python -m sigil_exp.export`). The evaluate, export and generate
CLIs all start here, so a damaged or wrong folder ends in the same one sentence naming the file.

    find_artifact(path) -> Artifact(kind run|adapter|export, folders, resolved_config.yaml)
    load_run_config(file) -> RunConfig
    load_for_generation(artifact, cfg) -> (model, tokenizer)   base (4-bit as trained) + adapter, or the export
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from sigil_exp.config import RunConfig, SigilError

log = logging.getLogger(__name__)

EXPORT_MARKER = "sigil_export.json"  # written by the export; says where it came from and how it was merged
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WHAT = "pass a run folder (outputs/<date>/<time>), its adapter/ folder, or an export folder"


@dataclass
class Artifact:
    kind: str  # run | adapter | export
    path: Path  # the folder given
    config: Path  # the run's resolved_config.yaml (an export carries a copy)
    adapter: Path | None = None  # adapter folder (run, adapter)
    run: Path | None = None  # run folder, when known
    model: Path | None = None  # merged checkpoint folder (export)


def find_artifact(path: str | Path) -> Artifact:
    """Classify and check a folder; any problem is one SigilError naming the file and the fix."""
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise SigilError(f"{p} is not a folder; {WHAT}.")
    if (p / EXPORT_MARKER).is_file():
        check_checkpoint(p)
        art = Artifact("export", p, p / "resolved_config.yaml", model=p)
    elif (p / "adapter_config.json").is_file():
        art = Artifact("adapter", p, p.parent / "resolved_config.yaml", adapter=p, run=p.parent)
    elif (p / "adapter" / "adapter_config.json").is_file():
        art = Artifact("run", p, p / "resolved_config.yaml", adapter=p / "adapter", run=p)
    elif (p / "resolved_config.yaml").is_file():
        raise SigilError(f"{p} is a run folder without adapter/adapter_config.json (the run did not finish or failed: "
                         f"see {p / 'metrics.json'}); train it to the end (train.resume=auto) or pass another run.")
    else:
        raise SigilError(f"{p} holds neither adapter_config.json, adapter/adapter_config.json nor {EXPORT_MARKER}; "
                         f"{WHAT}.")
    if art.adapter is not None:
        check_adapter(art.adapter)
    if not art.config.is_file():
        raise SigilError(f"{art.config} does not exist, so the base model and prompt format are unknown; "
                         "pass a folder written by `python -m sigil_exp` (or `python -m sigil_exp.export`).")
    return art


def check_adapter(adapter: Path) -> None:
    """adapter_config.json parses and the weights file is there and complete."""
    try:
        json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise SigilError(f"{adapter / 'adapter_config.json'} is not readable JSON ({e}); re-save the adapter "
                         "(re-run training with train.resume=auto).") from None
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (adapter / "adapter_model.bin").is_file():
            return
        raise SigilError(f"{weights} is missing (the adapter save did not finish); re-run training with "
                         "train.resume=auto, or pass a complete adapter folder.")
    check_safetensors(weights)


def check_checkpoint(folder: Path) -> None:
    """A merged checkpoint: config.json and every safetensors shard complete."""
    if not (folder / "config.json").is_file():
        raise SigilError(f"{folder / 'config.json'} is missing; re-run `python -m sigil_exp.export` for this folder.")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise SigilError(f"{index} is damaged ({e}); re-run `python -m sigil_exp.export`.") from None
    else:
        shards = ["model.safetensors"]
    for shard in shards:
        if not (folder / shard).is_file():
            raise SigilError(f"{folder / shard} is missing; re-run `python -m sigil_exp.export` for this folder.")
        check_safetensors(folder / shard)


def check_safetensors(path: Path) -> None:
    """The header parses and the file is as long as its tensors say (a cut-off copy or save fails here)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise SigilError(f"{path} is damaged or truncated ({e}); re-save it (re-run training with train.resume=auto, "
                         "or the export).") from None
    if 8 + n + end > size:
        raise SigilError(f"{path} is truncated ({size} of {8 + n + end} bytes); re-save it (re-run training with "
                         "train.resume=auto, or the export).")


def load_run_config(config: Path) -> RunConfig:
    from omegaconf import OmegaConf

    from sigil_exp.config import to_object

    try:
        return to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(config)))
    except SigilError:
        raise
    except Exception as e:  # omegaconf's errors name the key
        raise SigilError(f"{config} does not match the RunConfig schema ({type(e).__name__}: {e}); "
                         "re-create it with the current sigil_exp.") from None


def load_tokenizer_for(art: Artifact, cfg: RunConfig):
    """The tokenizer saved with the adapter or export, else the base model's."""
    from sigil_exp.model import load_tokenizer

    folder = art.model or art.adapter
    if folder is not None and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return load_tokenizer(cfg.model, str(folder))
    return load_tokenizer(cfg.model)


def load_for_generation(art: Artifact, cfg: RunConfig):
    """(model, tokenizer) in eval mode: the run's base as trained (same quantisation) + the adapter
    through peft, or the export's merged checkpoint in its own dtype."""
    from sigil_exp.model import check_device

    tokenizer = load_tokenizer_for(art, cfg)
    check_device(cfg.hardware)
    if art.kind == "export":
        from transformers import AutoModelForCausalLM

        from sigil_exp.attention import register_sdpa_varlen

        register_sdpa_varlen()  # sdpa + copy-free grouped-query decode steps
        model = AutoModelForCausalLM.from_pretrained(
            str(art.model), dtype="auto", device_map={"": 0} if cfg.hardware.device == "cuda" else "cpu",
            attn_implementation="sdpa_varlen")
    else:
        from peft import PeftModel

        from sigil_exp.model import load_base_model

        base = load_base_model(cfg.model, cfg.quant, cfg.hardware)
        if cfg.quant.method != "none" and cfg.hardware.upcast_non_lora:
            # what training computed with (model.prepare_for_training): norms, embeddings and lm_head in fp32
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        model = PeftModel.from_pretrained(base, str(art.adapter))  # inference mode: nothing trainable
    model.eval()
    return model, tokenizer
