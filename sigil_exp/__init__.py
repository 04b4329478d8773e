"""sigil_exp: QLoRA fine-tuning experiments for Llama 3 family models on Rust code."""

__version__ = "0.1.0"
