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
from typing import Any

from sigil_exp.config import SigilError
from sigil_exp.data.format import encode_prompt
from sigil_exp.evaluate.problems import Problem
from sigil_exp.evaluate.rust_lex import body_end

log = logging.getLogger(__name__)

ENGINES = ("sigil", "static", "hf")
WEIGHTS = ("auto", "trained", "dense", "merged")
_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*[ \t]*\n(.*?)(?:```|\Z)", re.S)


@dataclass(frozen=True)
class GenConfig:
    fmt: str = "completion"  # completion | chat (data.format the adapter was trained with)
    n_samples: int = 1
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 0  # rows per batch at most; 0 = as many as memory allows
    seed: int = 0
    # trained (the model as trained: 4-bit base + LoRA) | dense (a copy of the dequantised base in the compute dtype,
    # the adapter beside it: the same weights, faster) | merged (the adapter merged into it) | auto (dense on CUDA if it fits)
    weights: str = "auto"
    engine: str = "sigil"  # sigil (own loop) | static (transformers generate, static cache, compiled on CUDA) | hf (generate: the old path)
    ignore_stop: bool = False  # benchmarks on random weights: no EOS or brace stop, every row runs to max_new_tokens
    memory_gb: float | None = None  # CUDA: the most the process may hold (hardware.gpu_memory_gb); None = all that is free


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


def eos_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for extra in ("<|eot_id|>", "<|end_of_text|>"):
        tid = tokenizer.convert_tokens_to_ids(extra) if extra in tokenizer.get_vocab() else None
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids


def _checked(cfg: GenConfig, tokenizer) -> GenConfig:
    if cfg.fmt == "text":  # trained on raw code: the problem's prompt is simply continued
        cfg = replace(cfg, fmt="completion")
    if cfg.fmt not in ("completion", "chat"):
        raise SigilError(f"data.format={cfg.fmt!r} cannot be evaluated; use data.format=completion, chat or text.")
    if cfg.fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise SigilError("data.format=chat but the tokenizer has no chat template; evaluate with data.format=completion.")
    if cfg.weights not in WEIGHTS:
        raise SigilError(f"eval.weights={cfg.weights!r} is not one of {', '.join(WEIGHTS)}.")
    if cfg.engine not in ENGINES:
        raise SigilError(f"engine={cfg.engine!r} is not one of {', '.join(ENGINES)}.")
    return cfg


@dataclass
class Generated:
    rows: list[tuple[int, int]]  # (problem index, sample index) of each generated row
    ids: list[list[int]]  # its new token ids (a final EOS included)
    stats: dict[str, Any]  # engine, merged, batch, waves, new_tokens, seconds, ...


def generate_tokens(model, tokenizer, problems: list[Problem], cfg: GenConfig) -> Generated:
    """Every sample of every problem: on a dense copy of the model when chosen/affordable
    (`generation_model`), rows sorted by prompt length in batches as large as memory allows."""
    import torch

    cfg = _checked(cfg, tokenizer)
    greedy = cfg.temperature <= 0
    reps = 1 if greedy else cfg.n_samples  # greedy samples are identical: generate once, copy
    if greedy and cfg.n_samples > 1:
        log.warning("eval.temperature=0 (greedy) with eval.n_samples=%d: the samples are identical copies; "
                    "set eval.temperature>0 for a meaningful pass@k.", cfg.n_samples)
    inputs = _model_inputs(tokenizer, problems, cfg.fmt)
    was_training = model.training
    model.eval()
    gen_model, how, merge_s = generation_model(model, cfg.weights, cfg.memory_gb)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            if cfg.engine == "hf":  # the old path: problem order, fixed batches of 8, transformers generate
                rows = [(pi, s) for pi in range(len(problems)) for s in range(reps)]
                batch = cfg.batch_size or 8
            else:
                order = sorted(range(len(problems)), key=lambda i: -len(inputs[i]))
                rows = [(pi, s) for pi in order for s in range(reps)]
                batch = cfg.batch_size or auto_batch(gen_model, len(inputs[order[0]]) if order else 1,
                                                     cfg.max_new_tokens, len(rows), cfg.memory_gb)
            ids = _run_waves(gen_model, tokenizer, problems, inputs, rows, batch, cfg, t0)
        seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
        if gen_model is not model:
            del gen_model
            _free_cuda()
    new_tokens = sum(len(x) for x in ids)
    stats = {"engine": cfg.engine, "model": how, "merge_s": round(merge_s, 2), "batch": min(batch, len(rows)),
             "waves": -(-len(rows) // max(batch, 1)), "rows": len(rows), "new_tokens": new_tokens,
             "seconds": round(seconds, 3), "new_tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1)}
    log.info("generation: %(rows)d rows in %(waves)d batch(es) of up to %(batch)d (%(engine)s, %(model)s), "
             "%(new_tokens)d new tokens in %(seconds).1fs = %(new_tokens_per_s).0f tokens/s", stats)
    return Generated(rows=rows, ids=ids, stats=stats)


def _run_waves(model, tokenizer, problems, inputs, rows, batch, cfg: GenConfig, t0: float) -> list[list[int]]:
    import torch

    from sigil_exp.evaluate.decode import DecodeParams, decode_batch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = eos_ids(tokenizer)
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    params = DecodeParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          eos_ids=tuple(eos), pad_id=pad_id, ignore_stop=cfg.ignore_stop,
                          prefill_tokens=16384 if device.type == "cuda" else 4096)
    candidates = {i for t, i in tokenizer.get_vocab().items() if "}" in t}
    out: list[list[int]] = []
    for start in range(0, len(rows), batch):
        wave = rows[start:start + batch]
        if cfg.engine == "sigil":
            uniq = list(dict.fromkeys(pi for pi, _ in wave))
            slot = {pi: k for k, pi in enumerate(uniq)}

            def stop(r: int, ids: list[int], wave=wave) -> bool:
                text = tokenizer.decode(ids, skip_special_tokens=True)
                return extract_completion(text, cfg.fmt, problems[wave[r][0]].entry_point)[1]

            out += decode_batch(model, [inputs[pi] for pi in uniq], [slot[pi] for pi, _ in wave], params, stop,
                                candidates, generator)
        else:
            out += _hf_generate(model, tokenizer, [inputs[pi] for pi, _ in wave],
                                [problems[pi].entry_point for pi, _ in wave], cfg, pad_id, eos)
        log.info("generated %d/%d sequences (%.1fs)", min(start + batch, len(rows)), len(rows), time.perf_counter() - t0)
    return out


def _hf_generate(model, tokenizer, prompts: list[list[int]], entry_points: list[str], cfg: GenConfig, pad_id: int,
                 eos: list[int]) -> list[list[int]]:
    """transformers' generate on one left-padded batch (engine hf: dynamic cache; static: static
    cache, which transformers compiles on CUDA); the brace stop ends the batch when every row is done."""
    import torch
    from transformers import GenerationConfig

    greedy = cfg.temperature <= 0
    device = next(model.parameters()).device
    width = max(len(r) for r in prompts)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in prompts], device=device)
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=not greedy,
                               temperature=cfg.temperature if not greedy else None,
                               top_p=cfg.top_p if not greedy else None, top_k=None, pad_token_id=pad_id,
                               eos_token_id=eos, min_new_tokens=cfg.max_new_tokens if cfg.ignore_stop else None,
                               cache_implementation="static" if cfg.engine == "static" else None)
    stopping = [] if cfg.ignore_stop else [make_stopping_criteria(tokenizer, width, cfg.fmt, entry_points)]
    seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, stopping_criteria=stopping)
    out = []
    for row in seqs[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), None)
        row = row[:cut] if cut is not None else row
        while row and row[-1] == pad_id and pad_id not in eos:
            row.pop()
        out.append(row)
    return out


def generation_model(model, weights: str = "auto", memory_gb: float | None = None):
    """(model to generate with, "trained" | "dense" | "merged" | "plain", seconds spent building it).

    A peft model gets a copy in its compute dtype (bf16 on GPUs) built from its own (4-bit) weights
    (`full_precision_copy`: "dense" keeps the adapter beside the dequantised weights, "merged" merges
    it) when `weights` asks, or
    under "auto" on CUDA if the copy, a first batch's KV cache and some slack fit in the room left
    (`cuda_room`). On the CPU auto keeps the trained model itself: exact, and no copy to build."""
    import torch

    from sigil_exp.merge import compute_dtype, full_precision_bytes, full_precision_copy

    if not hasattr(model, "peft_config"):
        return model, "plain", 0.0
    device, dtype = next(model.parameters()).device, compute_dtype(model)
    if weights == "auto":
        weights = "trained"
        if device.type == "cuda" and not _has_int8(model):
            _free_cuda()
            need, room = full_precision_bytes(model, dtype), cuda_room(device, memory_gb)
            total = torch.cuda.mem_get_info(device)[1] if memory_gb is None else int(memory_gb * 1e9)
            weights = "dense" if need + max(4 << 30, total // 10) < room else "trained"
            log.info("eval.weights=auto: a dense copy needs %.1f GB, %.1f GB left -> %s", need / 1e9, room / 1e9,
                     weights)
    if weights == "trained":
        return model, "trained", 0.0
    t0 = time.perf_counter()
    copy = full_precision_copy(model, dtype, merge=weights == "merged")
    log.info("built a %s copy of the model (adapter %s) in %.1fs", str(dtype).removeprefix("torch."),
             "merged" if weights == "merged" else "beside", time.perf_counter() - t0)
    return copy, weights, time.perf_counter() - t0


def cuda_room(device, memory_gb: float | None) -> int:
    """Bytes generation may still allocate on `device`: what is free, and under a `memory_gb` cap
    (hardware.gpu_memory_gb) what the process does not hold yet."""
    import torch

    _free_cuda()
    room = torch.cuda.mem_get_info(device)[0]
    if memory_gb is not None:
        room = min(room, int(memory_gb * 1e9) - torch.cuda.memory_allocated(device))
    return max(room, 0)


def auto_batch(model, prompt_width: int, max_new_tokens: int, n_rows: int, memory_gb: float | None = None) -> int:
    """Rows per batch: on CUDA as many as the room left holds (KV cache of prompt + new tokens,
    float32 logits, a prefill reserve; `cuda_room`); on the CPU up to 256."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return max(1, min(n_rows, 256))
    c = model.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv_per_token = 2 * c.num_hidden_layers * (getattr(c, "num_key_value_heads", None) or heads) * head_dim * 2
    per_row = kv_per_token * (prompt_width + max_new_tokens) + c.vocab_size * 4 * 4
    prefill = 16384 * (c.hidden_size * 16 + getattr(c, "intermediate_size", 4 * c.hidden_size) * 6)
    room = cuda_room(device, memory_gb)
    rows = int((0.85 * room - prefill) // per_row)
    log.info("eval.batch_size=auto: %.1f GB left%s, %.2f MB per row -> %d rows", room / 1e9,
             f" under {memory_gb:.1f} GB" if memory_gb is not None else "", per_row / 1e6, rows)
    return max(1, min(n_rows, rows))


def _has_int8(model) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def generate_completions(model, tokenizer, problems: list[Problem], cfg: GenConfig) -> list[Completion]:
    """n_samples completions per problem, cut at the function's closing brace."""
    cfg = _checked(cfg, tokenizer)
    greedy = cfg.temperature <= 0
    g = generate_tokens(model, tokenizer, problems, cfg)
    out: list[Completion] = []
    for (pi, s), ids in zip(g.rows, g.ids, strict=True):
        p = problems[pi]
        raw = tokenizer.decode(ids, skip_special_tokens=True)
        body, finished = extract_completion(raw, cfg.fmt, p.entry_point)
        for k in (range(cfg.n_samples) if greedy else [s]):
            out.append(Completion(task_id=p.task_id, category=p.category, sample_idx=k, prompt=p.prompt,
                                  test=p.test, entry_point=p.entry_point, completion=body, raw=raw,
                                  finished=finished, gen_tokens=len(ids)))
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
