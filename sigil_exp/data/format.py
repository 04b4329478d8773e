"""How a record becomes model text. Training and evaluation both call these, so the prompt a
model is evaluated on is byte-for-byte the prompt format it was trained on."""

from __future__ import annotations

from typing import Any

# completion format: the model sees `prompt + SEPARATOR` and learns to write `gen`.
SEPARATOR = "\n"


def completion_prompt(prompt: str) -> str:
    """The text before the completion in `data.format=completion`."""
    return prompt.rstrip("\n") + SEPARATOR


def chat_messages(prompt: str, gen: str | None = None) -> list[dict[str, str]]:
    """The chat form of a {prompt, gen} record (`data.format=chat`); gen=None for generation."""
    messages = [{"role": "user", "content": prompt}]
    if gen is not None:
        messages.append({"role": "assistant", "content": gen})
    return messages


def render_prompt(prompt: str, fmt: str, tokenizer: Any) -> str:
    """The exact string the model sees before it starts generating, for either format."""
    if fmt == "chat":
        return tokenizer.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
    return completion_prompt(prompt)
