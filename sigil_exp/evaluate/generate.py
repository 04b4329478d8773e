"""Generate completions for Rust problems with a loaded model (base + adapter, peft or merged).

The prompt tokens are exactly the ones training puts before a completion
(`sigil_exp.data.format.encode_prompt`, BOS included once). Generation is batched with left padding; each
sequence stops as soon as the function's closing brace has been generated (a StoppingCriteria
tracking brace depth outside string/char literals and comments), and the completion is cut there.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sigil_exp.config import SigilError
from sigil_exp.data.format import encode_prompt
from sigil_exp.evaluate.problems import Problem
from sigil_exp.evaluate.rust_lex import body_end

log = logging.getLogger(__name__)

_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*[ \t]*\n(.*?)(?:```|\Z)", re.S)


@dataclass(frozen=True)
class GenConfig:
    fmt: str = "completion"  # completion | chat (data.format the adapter was trained with)
    n_samples: int = 1
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 8
    seed: int = 0


@dataclass
class Completion:
    task_id: str
    category: str
    sample_idx: int
    prompt: str  # the problem's prompt (not the rendered model input)
    test: str
    entry_point: str
    completion: str  # what gets compiled after the prompt: the body up to its closing brace
    raw: str  # the decoded generation before cutting
    finished: bool  # the closing brace was found
    gen_tokens: int

    def to_json(self) -> dict:
        return asdict(self)


def extract_completion(text: str, fmt: str, entry_point: str) -> tuple[str, bool]:
    """(body up to and including the function's closing brace, whether that brace was found).

    completion format: the text continues the prompt, so it is the body itself. chat format: the
    reply may wrap code in a fence and repeat the signature; the body after `fn <entry_point>`'s
    opening brace is used, else the whole (fenced) reply."""
    if fmt == "chat":
        fenced = _FENCE.search(text)
        if fenced:
            text = fenced.group(1)
        m = re.search(rf"\bfn\s+{re.escape(entry_point)}\b[^{{;]*\{{", text)
        if m:
            text = text[m.end():]
    end = body_end(text)
    return (text, False) if end is None else (text[:end], True)


def make_stopping_criteria(tokenizer, prompt_len: int, fmt: str, entry_points: list[str]):
    """A transformers StoppingCriteria: a row is done once its function body is closed."""
    import torch
    from transformers import StoppingCriteria

    class BraceStop(StoppingCriteria):
        def __init__(self):
            self.done = [False] * len(entry_points)

        def __call__(self, input_ids, scores, **kwargs):
            last = tokenizer.convert_ids_to_tokens(input_ids[:, -1].tolist())
            for i, tok in enumerate(last):
                # a brace can only close the body on a token that holds `}` (byte-level BPE keeps it)
                if not self.done[i] and tok is not None and "}" in tok:
                    text = tokenizer.decode(input_ids[i, prompt_len:], skip_special_tokens=True)
                    self.done[i] = extract_completion(text, fmt, entry_points[i])[1]
            return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    return BraceStop()


def _model_inputs(tokenizer, problems: list[Problem], fmt: str) -> list[list[int]]:
    """Token ids of each prompt, exactly as training encodes the text before a completion."""
    return [encode_prompt(p.prompt, fmt, tokenizer) for p in problems]


def _eos_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for extra in ("<|eot_id|>", "<|end_of_text|>"):
        tid = tokenizer.convert_tokens_to_ids(extra) if extra in tokenizer.get_vocab() else None
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids


def generate_completions(model, tokenizer, problems: list[Problem], cfg: GenConfig) -> list[Completion]:
    """n_samples completions per problem, batched with left padding."""
    import torch
    from transformers import GenerationConfig

    if cfg.fmt == "text":  # trained on raw code: the problem's prompt is simply continued
        cfg = replace(cfg, fmt="completion")
    if cfg.fmt not in ("completion", "chat"):
        raise SigilError(f"data.format={cfg.fmt!r} cannot be evaluated; use data.format=completion, chat or text.")
    if cfg.fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise SigilError("data.format=chat but the tokenizer has no chat template; evaluate with data.format=completion.")
    greedy = cfg.temperature <= 0
    reps = 1 if greedy else cfg.n_samples  # greedy samples are identical: generate once, copy
    if greedy and cfg.n_samples > 1:
        log.warning("eval.temperature=0 (greedy) with eval.n_samples=%d: the samples are identical copies; "
                    "set eval.temperature>0 for a meaningful pass@k.", cfg.n_samples)
    torch.manual_seed(cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=not greedy,
                               temperature=cfg.temperature if not greedy else None,
                               top_p=cfg.top_p if not greedy else None, top_k=None,
                               pad_token_id=pad_id, eos_token_id=_eos_ids(tokenizer))
    device = next(model.parameters()).device
    inputs = _model_inputs(tokenizer, problems, cfg.fmt)
    queue = [(pi, s) for pi in range(len(problems)) for s in range(reps)]
    out: list[Completion] = []
    t0 = time.perf_counter()
    for start in range(0, len(queue), cfg.batch_size):
        chunk = queue[start:start + cfg.batch_size]
        rows = [inputs[pi] for pi, _ in chunk]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        stop = make_stopping_criteria(tokenizer, width, cfg.fmt, [problems[pi].entry_point for pi, _ in chunk])
        with torch.inference_mode():
            seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                  stopping_criteria=[stop])
        for (pi, s), row in zip(chunk, seqs, strict=True):
            gen = row[width:]
            n_tok = int((gen != pad_id).sum())
            raw = tokenizer.decode(gen, skip_special_tokens=True)
            p = problems[pi]
            body, finished = extract_completion(raw, cfg.fmt, p.entry_point)
            copies = range(cfg.n_samples) if greedy else [s]
            for k in copies:
                out.append(Completion(task_id=p.task_id, category=p.category, sample_idx=k, prompt=p.prompt,
                                      test=p.test, entry_point=p.entry_point, completion=body, raw=raw,
                                      finished=finished, gen_tokens=n_tok))
        log.info("generated %d/%d sequences (%.1fs)", min(start + cfg.batch_size, len(queue)), len(queue),
                 time.perf_counter() - t0)
    order = {p.task_id: i for i, p in enumerate(problems)}
    out.sort(key=lambda c: (order[c.task_id], c.sample_idx))
    return out


def write_completions(path: Path, completions: Iterable[Completion]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for c in completions:
            f.write(json.dumps(c.to_json(), ensure_ascii=False) + "\n")


def read_completions(path: Path) -> list[Completion]:
    """Completions saved by `write_completions` (re-execution needs no model)."""
    path = Path(path)
    if not path.is_file():
        raise SigilError(f"Completions file {path} does not exist; pass the completions.jsonl an evaluation wrote "
                         "(<run>/eval/completions.jsonl).")
    out = []
    fields = set(Completion.__dataclass_fields__)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                missing = {"task_id", "prompt", "test", "completion"} - set(rec)
                if missing:
                    raise ValueError(f"missing {', '.join(sorted(missing))}")
            except ValueError as e:
                raise SigilError(f"{path}:{lineno} is not a completion record ({e}); "
                                 "re-create the file with `python -m sigil_exp.evaluate <run>`.") from None
            rec.setdefault("category", "uncategorized")
            rec.setdefault("sample_idx", 0)
            rec.setdefault("entry_point", "")
            rec.setdefault("raw", rec["completion"])
            rec.setdefault("finished", True)
            rec.setdefault("gen_tokens", 0)
            out.append(Completion(**{k: v for k, v in rec.items() if k in fields}))
    return out
