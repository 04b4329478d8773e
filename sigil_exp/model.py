"""Tokenizer, quantised base model and LoRA adapter: the three things a run trains with."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from sigil_exp.config import HardwareConfig, LoraConfig, ModelConfig, QuantConfig, SigilError

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local directory to load from: the tiny model is built on first use; a hub id is looked
    up in the local Hugging Face cache, then downloaded if the machine is online."""
    if cfg.build_tiny is not None:
        from sigil_exp.tiny import build_tiny

        return str(build_tiny(cfg.name_or_path, cfg.build_tiny))
    local = Path(cfg.name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise SigilError(f"model.name_or_path={cfg.name_or_path} is a directory without config.json; "
                             "point it at a folder that holds a transformers checkpoint.")
        return str(local)
    looks_like_path = cfg.name_or_path.startswith(("/", ".", "~")) or cfg.name_or_path.count("/") > 1
    hint = ("set model.name_or_path=/path/to/a/local/copy (config.json + *.safetensors + tokenizer), "
            "or run `make demo` for the tiny local model")
    if looks_like_path:
        raise SigilError(f"Model directory {local} does not exist; {hint}.")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return snapshot_download(cfg.name_or_path, revision=cfg.revision, local_files_only=True, allow_patterns=patterns)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise SigilError(f"Model {cfg.name_or_path!r} is not a local directory and not in the Hugging Face cache "
                         f"(HF_HUB_OFFLINE is set, so nothing was downloaded); {hint}.")
    try:
        log.info("Downloading %s from the Hugging Face hub", cfg.name_or_path)
        return snapshot_download(cfg.name_or_path, revision=cfg.revision, allow_patterns=patterns)
    except Exception as e:
        raise SigilError(f"Model {cfg.name_or_path!r} is not a local directory, not in the Hugging Face cache, and "
                         f"could not be downloaded ({type(e).__name__}); {hint}.") from None


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path or resolve_model_path(cfg), revision=cfg.revision if path is None else None,
                                        trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:  # Llama 3 ships no pad token; its reserved fine-tune pad id is the usual choice
        pad = "<|finetune_right_pad_id|>"
        tok.pad_token = pad if pad in tok.get_vocab() else tok.eos_token
    tok.padding_side = "right"
    return tok


def check_device(hw: HardwareConfig) -> None:
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise SigilError(f"hardware={hw.name} needs a CUDA GPU but torch sees none on this machine; "
                         "use hardware=cpu (or `make demo`, which runs experiment=smoke on the CPU).")


def bnb_config(q: QuantConfig):
    from transformers import BitsAndBytesConfig

    if q.method == "none":
        return None
    if q.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.method, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype], bnb_4bit_quant_storage=DTYPES.get(q.quant_storage, torch.uint8),
    )


def load_base_model(cfg: ModelConfig, q: QuantConfig, hw: HardwareConfig, path: str | None = None):
    """The frozen base, loaded through the same `from_pretrained` path for every model."""
    from transformers import AutoModelForCausalLM

    check_device(hw)
    path = path or resolve_model_path(cfg)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=cfg.revision if not Path(path).is_dir() else None, quantization_config=bnb_config(q),
        dtype=DTYPES[q.compute_dtype], device_map={"": 0} if hw.device == "cuda" else "cpu",
        attn_implementation=hw.attn_implementation, trust_remote_code=cfg.trust_remote_code,
    )
    if hw.liger_kernel:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError:
            raise SigilError("hardware.liger_kernel=true needs liger-kernel: `pip install -e .[fast]`, "
                             "or set hardware.liger_kernel=false.") from None
        apply_liger_kernel_to_llama(model=model)
    return model


def prepare_for_training(model, q: QuantConfig, hw: HardwareConfig):
    """Gradient checkpointing and input grads; the fp32 upcast of norms/embeddings/lm_head is a knob."""
    ckpt_kwargs = {"use_reentrant": hw.checkpointing_reentrant}
    if q.method != "none" and hw.upcast_non_lora:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=hw.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=ckpt_kwargs)
    for p in model.parameters():
        p.requires_grad_(False)
    if hw.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    return model


def peft_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    init: Any = True if lora.init_weights == "default" else lora.init_weights
    return PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias=lora.bias, use_rslora=lora.use_rslora, use_dora=lora.use_dora, init_lora_weights=init,
        task_type="CAUSAL_LM",
    )


def attach_lora(model, lora: LoraConfig, init_adapter: str | None = None):
    """New LoRA adapters, or (phase 2) the given adapter loaded trainable."""
    from peft import PeftModel, get_peft_model

    if init_adapter:
        path = Path(init_adapter).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise SigilError(f"train.init_adapter={init_adapter} holds no adapter_config.json; "
                             "point it at a run's adapter folder (outputs/<run>/adapter).")
        return PeftModel.from_pretrained(model, str(path), is_trainable=True)
    return get_peft_model(model, peft_config(lora))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as the parameters they stand for."""
    return model.get_nb_trainable_parameters()


def quantized_linear_count(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) for m in model.modules())
