"""Checks that need more than the config, run before any W&B run, data work or model load.

`check_run(cfg)` validates the values (validation.validate), finds the model (a local folder, the tiny
model, or the Hugging Face cache), checks `lora.target_modules` against the model's module names
(read from its config.json: the model is built on the meta device, no weights), the device, the
phase-2 adapter and the evaluation's setup. Each failure is one sentence naming the key and the fix.
"""

from __future__ import annotations

from pathlib import Path

from sigil_exp import model as modeling
from sigil_exp.config import RunConfig, SigilError
from sigil_exp.validation import validate


def check_run(cfg: RunConfig) -> str:
    """All the checks; returns the model's local path."""
    validate(cfg)
    model_path = modeling.resolve_model_path(cfg.model)
    check_target_modules(cfg, model_path)
    modeling.check_device(cfg.hardware)
    if cfg.train.init_adapter and not (Path(cfg.train.init_adapter).expanduser() / "adapter_config.json").is_file():
        raise SigilError(f"train.init_adapter={cfg.train.init_adapter} holds no adapter_config.json; point it at the "
                         "adapter folder of a finished run (<run folder>/adapter).")
    from sigil_exp.evaluate import check_eval_setup

    check_eval_setup(cfg)  # eval.enabled / eval.every_steps: problems, eval.subset, rustc, sandbox; now, not after training
    return model_path


def module_names(model_path: str, trust_remote_code: bool = False) -> tuple[set[str], list[str]]:
    """(every module name, the distinct names of its linear layers) of the model in `model_path`, built
    from config.json on the meta device: no weights are read and no memory is used."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names = {name for name, _ in model.named_modules() if name}
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
                    - {"lm_head"})
    return names, linear


def check_target_modules(cfg: RunConfig, model_path: str) -> None:
    """Every `lora.target_modules` entry must name modules of the model, as peft matches them (the full
    name or its last parts), or be peft's `all-linear`."""
    targets = [t for t in cfg.lora.target_modules if t != "all-linear"]
    if not targets:
        return
    names, linear = module_names(model_path, cfg.model.trust_remote_code)
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise SigilError(f"lora.target_modules has {', '.join(unknown)}, which {cfg.model.name} does not have; its "
                         f"linear layers are {', '.join(linear)} (or pick lora=all|attn|mlp).")
