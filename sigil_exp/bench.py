"""GPU benchmark: the naive QLoRA recipe and every GPU hardware preset, side by side, one process
per row, on identical token batches.

    python -m sigil_exp.bench                       # 8B shapes, seq 2048, all GPU presets (one H200: ~5 min)
    python -m sigil_exp.bench --tiny                # the same code path on the CPU in seconds (CI)
    python -m sigil_exp.bench --presets h200 --seq 4096 --naive-batch 4 --out bench.json

What runs. A Llama model of the requested shape (default Llama-3.1-8B: vocab 128256, hidden 4096,
32 layers, GQA 8) gets random bf16 weights and is saved with `save_pretrained`, then every row loads
it through `sigil_exp.model.load_base_model` (NF4 + double quant, as a real checkpoint), and builds
it with the functions `train()` uses (prepare_for_training, attach_lora). Rows:

    naive        prepare_model_for_kbit_training, LoRA r16/a16/dropout 0.05 on all 7 projections,
                 reentrant gradient checkpointing, paged AdamW 8-bit, SDPA, no packing
    <preset>     `python -m sigil_exp hardware=<preset>` as composed by Hydra (conf/), with the
                 default LoRA (the same r16/a16/dropout 0.05 on the same 7 projections)

The training step is a faithful copy of trl's SFTTrainer step, not SFTTrainer itself (so batches,
order and timing are under control): the optimizer class and arguments come from
`Trainer.get_optimizer_cls_and_kwargs(sft_config(cfg))`; LoRA weights are cast to bf16 as trl does
for quantised models; gradient checkpointing is enabled as the Trainer does; batches are collated
by trl's own `DataCollatorForLanguageModeling` with the preset's padding-free setting; forward and
loss run under bf16 autocast as accelerate does; then clip_grad_norm_(max_grad_norm), optimizer
and scheduler steps. One step = one micro-batch forward + backward + optimizer step
(grad_accum = 1 for every row, as in docs/gpu-baseline.md).

Each row has a speed phase (random token ids, warm-up steps, then timed steps; wall clock with a
device sync per step, plus CUDA-event split forward / backward / optimizer; peak allocated and
reserved memory) and, for the loss rows, a 30-step run on real text (the bundled Rust corpus, or
Python's own standard-library sources when the corpus is absent, tokenised by a byte-level BPE
trained in-process), starting from the same adapter initialisation, in the same order, with the
project's lr/schedule. The report compares each preset's per-step loss and final adapter with the
naive run's.

FLOPs (MFU). N = parameters of all linear projections + lm_head (7.50e9 at 8B). Per token:
model FLOPs = 2N forward + 2N backward (activation gradients only: the base is frozen) + 6 x LoRA
params + causal attention 6 * L * n_heads * head_dim * (S+1) (forward 2 matmuls over (S+1)/2
keys on average, backward twice that). Hardware FLOPs add the recomputed forward (2N + LoRA +
attention forward) when gradient checkpointing is on. MFU = tokens/s x model FLOPs / peak, with
the peak measured in the same process (a 8192^3 bf16 matmul), and also given against the datasheet
989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")
GPU_PRESETS = ["consumer_24gb", "a100_80gb", "h100", "h200"]
SPEED_PRESETS = ("h200", "h100")
MEMORY_PRESET = "consumer_24gb"
DATASHEET_TFLOPS = 989.0  # H100/H200 SXM dense bf16

SHAPES = {
    "8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "3b": dict(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab=128256),
    "1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256),
    "small": dict(hidden=1024, intermediate=2816, layers=2, heads=8, kv_heads=4, vocab=4096),
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512),
}


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------- the configs
def compose_preset(preset: str, overrides: list[str] | None = None):
    """The RunConfig `python -m sigil_exp hardware=<preset>` would build."""
    from hydra import compose, initialize_config_dir

    from sigil_exp.config import to_object

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_object(compose(config_name="config", overrides=[f"hardware={preset}", *(overrides or [])]))


def naive_config(micro_batch: int):
    """The naive recipe as most QLoRA scripts write it, on the project's default model/quant/LoRA."""
    from sigil_exp.config import HardwareConfig

    cfg = compose_preset("h100")
    cfg.hardware = HardwareConfig(
        name="naive", device="cuda", precision="bf16", micro_batch_size=micro_batch, grad_accum=1,
        gradient_checkpointing=True, checkpointing_reentrant=True, attn_implementation="sdpa",
        optimizer="paged_adamw_8bit", dataloader_workers=0, packing=False, liger_kernel=False, upcast_non_lora=True,
        torch_compile=False, gpu_memory_gb=None, lora_fused=False, auto_micro_batch=False, preflight=True,
        adapter_dtype="bfloat16")  # under autocast: trl's default for quantised bases
    return cfg


def row_config(spec: dict[str, Any]):
    cfg = naive_config(spec["micro_batch"] or 1) if spec["recipe"] == "naive" else compose_preset(spec["recipe"])
    if spec.get("overrides"):  # ablation rows: one lever of the preset reverted
        ov = dict(spec["overrides"])
        if "lora.dropout" in ov:
            cfg.lora.dropout = float(ov.pop("lora.dropout"))
        cfg.hardware = replace(cfg.hardware, **ov)
    hw = cfg.hardware
    if spec["tiny"]:  # the CPU stand-ins for what only exists on CUDA; everything else as configured
        cfg.hardware = replace(hw, device="cpu", liger_kernel=False, optimizer="adamw_torch", gpu_memory_gb=None,
                               auto_micro_batch=False)
    cfg.train.max_steps = spec["loss_steps"] or 1
    cfg.model.max_seq_len = spec["seq"]
    return cfg


# ------------------------------------------------------------------------ model, data, FLOPs
def build_random_model(shape: dict[str, int], out_dir: Path, device: str = "cpu") -> Path:
    """A Llama of `shape` with random bf16 weights, saved like a checkpoint (no download).
    On "cuda" the 8B init takes seconds instead of minutes on the CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out_dir / "config.json").is_file():
        return out_dir
    t0 = time.perf_counter()
    config = LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=1, pad_token_id=2, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(out_dir)
    del model
    gc.collect()
    _log(f"built random model {shape} in {time.perf_counter() - t0:.0f}s -> {out_dir}")
    return out_dir


def _corpus_texts(max_chars: int) -> tuple[list[str], str]:
    """Real text: the bundled Rust corpus, topped up with Python's standard-library sources."""
    import sysconfig

    from sigil_exp.paths import resolve

    texts, total, sources = [], 0, []
    rust = resolve("pkg://assets/rust_sample.jsonl")
    if rust.is_file():
        with rust.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    t = rec.get("text") or (rec.get("prompt", "") + rec.get("gen", ""))
                    if t:
                        texts.append(t)
                        total += len(t)
        sources.append(f"{rust.name} ({total} chars)")
    if total < max_chars:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        n0 = total
        for f in sorted(stdlib.glob("*.py")):
            try:
                t = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            texts.append(t)
            total += len(t)
            if total >= max_chars:
                break
        sources.append(f"python stdlib *.py ({total - n0} chars)")
    return texts, " + ".join(sources)


def real_text_tokens(n_tokens: int, vocab: int) -> tuple[list[int], str]:
    """`n_tokens` ids of real text from a byte-level BPE (vocab <= model vocab) trained on it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts, source = _corpus_texts(max_chars=max(200_000, n_tokens * 6))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 16384), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    ids: list[int] = []
    eos = tok.token_to_id("<eos>")
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
        if len(ids) >= n_tokens:
            break
    while len(ids) < n_tokens:  # small corpus: repeat it
        ids.extend(ids[: n_tokens - len(ids)])
    return ids[:n_tokens], source


def flops_per_token(shape: dict[str, int], lora_params: int, seq: int, checkpointing: bool) -> dict[str, float]:
    from sigil_exp.preflight import ModelShape

    s = ModelShape(**shape)
    n = s.matmul_params
    attn_fwd = 2 * s.layers * s.heads * s.hd * (seq + 1)  # QK^T and AV over (S+1)/2 keys on average, 2 FLOP/MAC
    model = 4 * n + 6 * lora_params + 3 * attn_fwd
    hardware = model + ((2 * n + 2 * lora_params + attn_fwd) if checkpointing else 0)
    return {"N_matmul": n, "model_flops_per_token": model, "hardware_flops_per_token": hardware}


# ----------------------------------------------------------------------------------- one row
def _lora_state(model) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _make_optimizer(model, cfg, steps: int):
    from transformers import Trainer, get_scheduler

    from sigil_exp.train import sft_config

    params = [p for p in model.parameters() if p.requires_grad]
    tr, hw = cfg.train, cfg.hardware
    try:
        args = sft_config(cfg, Path(os.environ.get("SIGIL_BENCH_WORK", "/tmp")) / "sft_args", has_eval=False)
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)  # what Trainer.create_optimizer uses
        warm = args.get_warmup_steps(steps)
        name, wd, sched_name = f"{cls.__module__}.{cls.__name__}", args.weight_decay, args.lr_scheduler_type
    except Exception as e:  # a transformers/trl version that rejects the project's SFTConfig: build it by hand
        import bitsandbytes as bnb

        if hw.optimizer in ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"):
            cls = bnb.optim.AdamW
            kwargs = {"lr": tr.lr, "betas": (0.9, 0.999), "eps": 1e-8, "optim_bits": 32 if "32bit" in hw.optimizer else 8,
                      "is_paged": hw.optimizer.startswith("paged")}
        else:
            cls, kwargs = torch_adamw(), {"lr": tr.lr, "betas": (0.9, 0.999), "eps": 1e-8}
        warm, wd, sched_name = math.ceil(steps * tr.warmup_ratio), tr.weight_decay, tr.scheduler
        name = f"{cls.__module__}.{cls.__name__} (by hand: sft_config failed: {type(e).__name__}: {e})"
    opt = cls([{"params": params, "weight_decay": wd}], **kwargs)
    sched = get_scheduler(sched_name, opt, num_warmup_steps=warm, num_training_steps=steps)
    return opt, sched, None, name


def torch_adamw():
    import torch

    return torch.optim.AdamW


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


def _categorise(name: str) -> str:
    n = name.lower()
    rules = [("dequant", ("kdequantize", "dequantize")), ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
             ("optimizer", ("koptimizer", "kprecondition", "adam", "multi_tensor", "optimizer")),
             ("liger/triton", ("_rms_norm", "rms_norm", "swiglu", "_rope", "liger", "cross_entropy", "element_mul",
                               "triton")),
             ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90", "sm80", "ampere", "wgmma", "splitk")),
             ("copy/cast", ("copy", "memcpy", "memset", "cat", "to_copy", "index")),
             ("dropout", ("dropout", "bernoulli", "philox", "fused_dropout")),
             ("elementwise/reduce", ("elementwise", "vectorized", "reduce", "fill", "mul", "add", "pow", "rsqrt",
                                     "silu", "softmax", "norm", "where", "clamp"))]
    for cat, keys in rules:
        if any(k in n for k in keys):
            return cat
    return "other"


def run_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one configuration and measure it (called in a child process, or in-process for --tiny)."""
    import torch

    from sigil_exp import model as modeling
    from sigil_exp.config import SigilError, validate
    from sigil_exp.preflight import ModelShape, check_fits, memory_budget

    t_row = time.perf_counter()
    cfg = row_config(spec)
    hw = cfg.hardware
    validate(cfg)
    device = torch.device("cuda" if hw.device == "cuda" else "cpu")
    out: dict[str, Any] = {"name": spec["name"], "recipe": spec["recipe"], "hardware": asdict(hw),
                           "ablation": bool(spec.get("ablation")), "overrides": spec.get("overrides"),
                           "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                                    "targets": list(cfg.lora.target_modules)}}
    shape_obj = ModelShape.from_model_dir(spec["model_dir"])
    seq = spec["seq"]
    budget = memory_budget(hw)
    if spec["micro_batch"] and spec["recipe"] != "naive":
        hw.micro_batch_size, hw.auto_micro_batch = spec["micro_batch"], False
    try:
        mb, est = check_fits(shape_obj, cfg.quant, cfg.lora, hw, seq, budget)
    except SigilError as e:
        out.update(status="does not fit", error=str(e))
        return out
    out.update(micro_batch=mb, seq=seq, estimate=est.as_dict(),
               budget_gb=None if budget.gb is None else round(budget.gb, 1), budget_source=budget.source)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # the bf16 matmul ceiling of this card, now (MFU denominator)
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(10):
            a @ b
        e1.record()
        e1.synchronize()
        out["peak_tflops_measured"] = round(10 * 2 * 8192 ** 3 / (e0.elapsed_time(e1) / 1e3) / 1e12, 1)
        del a, b
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    model = modeling.build_trainable_model(cfg.model, cfg.quant, cfg.lora, hw, spec["model_dir"],
                                           lora_seed=cfg.train.seed)
    amp = spec.get("autocast", True)
    out["autocast"] = amp
    # What train() does: trl casts LoRA weights to bf16 for quantised bases, then hardware.adapter_dtype
    # decides their storage (the fp32 step without autocast keeps them fp32).
    modeling.set_adapter_dtype(model, hw.adapter_dtype if amp else "float32")
    if hw.gradient_checkpointing:  # what Trainer + trl do for a PEFT model
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": hw.checkpointing_reentrant})
        model.enable_input_require_grads()
    model.train()
    out["load_s"] = round(time.perf_counter() - t0, 1)
    if device.type == "cuda":
        out["allocated_after_load_gb"] = round(torch.cuda.memory_allocated() / 1e9, 3)
    out["quantized_linears"] = modeling.quantized_linear_count(model)
    lora = _lora_state(model)
    out["lora_params"] = sum(p.numel() for p in lora.values())
    work = Path(spec["work_dir"])
    init_file = work / "adapter_init.pt"
    if init_file.is_file():  # every row starts from the naive row's adapter initialisation
        init = torch.load(init_file)
        with torch.no_grad():
            for n, p in lora.items():
                p.copy_(init[n])
    else:
        init = {n: p.detach().to("cpu", copy=True) for n, p in lora.items()}
        torch.save(init, init_file)
    init = {n: t.to("cpu") for n, t in init.items()}

    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=hw.packing)
    out["batch_layout"] = "padding-free [1, B*S] + position_ids/cu_seq_lens" if hw.packing else "[B, S] + attention_mask"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and hw.precision == "bf16")
    params = list(lora.values())

    def step(batch, opt, sched, events=None, probe=None):
        if probe is not None:
            probe["before"] = torch.cuda.memory_allocated()
        if events:
            events[0].record()
        with autocast:
            loss = model(**batch).loss
        if probe is not None:
            probe["after_forward"] = torch.cuda.memory_allocated()
        if events:
            events[1].record()
        loss.backward()
        if events:
            events[2].record()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if events:
            events[3].record()
        return loss

    # ---- speed phase: random ids, the row's micro-batch
    if spec["speed_steps"] > 0:
        gen = torch.Generator().manual_seed(1234)
        n_steps = spec["warmup"] + spec["speed_steps"]
        vocab = shape_obj.vocab
        batches = [collator([{"input_ids": torch.randint(3, vocab, (seq,), generator=gen).tolist()} for _ in range(mb)])
                   for _ in range(n_steps)]
        opt, sched, args, opt_name = _make_optimizer(model, cfg, n_steps)
        out["optimizer"] = opt_name
        times, split = [], []
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            for i, b in enumerate(batches):
                b = _to_device(b, device)
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if device.type == "cuda" else None
                probe = {} if (i == spec["warmup"] and device.type == "cuda") else None
                w0 = time.perf_counter()
                step(b, opt, sched, ev, probe)
                if device.type == "cuda":
                    ev[3].synchronize()
                if probe:
                    kept = probe["after_forward"] - probe["before"]
                    out["memory_probe"] = {
                        "allocated_before_step_gb": round(probe["before"] / 1e9, 3),
                        "kept_after_forward_gb": round(kept / 1e9, 3),
                        "kept_per_token_layer_kb": round(kept / (mb * seq) / shape_obj.layers / 1e3, 1)}
                w = time.perf_counter() - w0
                if i >= spec["warmup"]:
                    times.append(w)
                    if ev:
                        split.append([ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2]), ev[2].elapsed_time(ev[3])])
        except torch.OutOfMemoryError as e:
            out.update(status="out of memory", error=str(e).splitlines()[0])
            return out
        med = statistics.median(times)
        tokens = mb * seq
        out["speed"] = {"step_s": round(med, 4), "step_s_all": [round(t, 4) for t in times],
                        "tokens_per_step": tokens, "tokens_per_s": round(tokens / med, 1)}
        if split:
            f, bwd, o = (statistics.median(x[i] for x in split) for i in range(3))
            out["speed"]["split_ms"] = {"forward+loss": round(f, 1), "backward": round(bwd, 1),
                                        "clip+optimizer": round(o, 1)}
        if device.type == "cuda":
            out["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            out["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
            out["estimate_vs_measured"] = round(est.total_gb / out["peak_allocated_gb"], 3)
        if spec.get("profile") and device.type == "cuda":
            out["profile"] = _profile_step(step, batches[-1], device, opt, sched)
        del opt, sched, batches
        gc.collect()

    # ---- loss phase: real text, the naive row's adapter init, the project's lr schedule
    if spec["loss_steps"] > 0:
        with torch.no_grad():
            for n, p in lora.items():
                p.copy_(init[n])
        ids = torch.load(work / "tokens.pt")
        lb, lseq = spec["loss_batch"], spec["loss_seq"]
        opt, sched, args, opt_name = _make_optimizer(model, cfg, spec["loss_steps"])
        losses, times = [], []
        torch.manual_seed(cfg.train.seed)  # dropout masks: same seed, each recipe draws its own stream
        for i in range(spec["loss_steps"]):
            rows = [ids[(i * lb + j) * lseq:(i * lb + j + 1) * lseq].tolist() for j in range(lb)]
            b = _to_device(collator([{"input_ids": r} for r in rows]), device)
            w0 = time.perf_counter()
            loss = step(b, opt, sched)
            losses.append(float(loss.detach()))
            times.append(time.perf_counter() - w0)
        warm = min(2, len(times) - 1)
        med = statistics.median(times[warm:])
        out["loss"] = {"losses": [round(x, 5) for x in losses], "tokens_per_s": round(lb * lseq / med, 1),
                       "batch": lb, "seq": lseq, "lr": cfg.train.lr, "scheduler": cfg.train.scheduler}
        final = {n: p.detach().float().cpu() for n, p in lora.items()}
        torch.save(final, work / f"adapter_{_fname(spec['name'])}.pt")
        del opt, sched
    out["status"] = "ok"
    out["row_s"] = round(time.perf_counter() - t_row, 1)
    return out


def _profile_step(step, batch, device, opt, sched) -> dict[str, Any]:
    """One more step under torch.profiler: GPU kernel time by category, and the GPU's idle share."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    b = _to_device(batch, device)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        w0 = time.perf_counter()
        step(b, opt, sched)
        torch.cuda.synchronize()
        wall = time.perf_counter() - w0
    cats: dict[str, float] = {}
    kernels: list[tuple[str, float, int]] = []
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0)
        if not t or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        cats[_categorise(evt.key)] = cats.get(_categorise(evt.key), 0.0) + t / 1e3
        kernels.append((evt.key[:90], t / 1e3, evt.count))
    busy = sum(cats.values())
    kernels.sort(key=lambda k: -k[1])
    return {"wall_ms": round(wall * 1e3, 1), "gpu_busy_ms": round(busy, 1),
            "gpu_idle_share": round(max(0.0, 1 - busy / (wall * 1e3)), 3),
            "by_category_ms": {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n, "ms": round(t, 2), "calls": c} for n, t, c in kernels[:25]]}


# ------------------------------------------------------------------------------- the parent
def _row_specs(args, work: Path, model_dir: Path) -> list[dict[str, Any]]:
    """Rows in priority order (a run cut short still reports the important ones)."""
    base = {"tiny": args.tiny, "model_dir": str(model_dir), "work_dir": str(work), "warmup": args.warmup,
            "speed_steps": args.steps, "loss_batch": args.loss_batch, "loss_seq": args.seq, "profile": False}
    # the naive recipe as measured in docs/gpu-baseline.md: a plain step, fp32 adapters, no autocast
    naive_best = dict(base, name=f"naive_{args.naive_batch}x{args.seq}", recipe="naive", micro_batch=args.naive_batch,
                      seq=args.seq, loss_steps=0, speed_steps=args.naive_steps, warmup=min(args.warmup, 1),
                      autocast=False, profile=args.profile)
    naive_1 = dict(base, name=f"naive_1x{args.seq}", recipe="naive", micro_batch=1, seq=args.seq,
                   loss_steps=args.loss_steps, autocast=False)
    specs = [naive_1] if args.naive_batch == 1 else [naive_best, naive_1]
    for p in sorted(args.presets, key=lambda p: (p not in SPEED_PRESETS, p != "h200", p)):
        seq = args.long_seq if p == MEMORY_PRESET and args.long_seq else args.seq
        mb = (1 if p == MEMORY_PRESET else args.micro_batch) if args.micro_batch or p == MEMORY_PRESET else None
        if args.tiny and mb is None:
            mb = 2
        specs.append(dict(base, name=f"{p}_{'auto' if mb is None else mb}x{seq}", recipe=p, micro_batch=mb, seq=seq,
                          loss_steps=args.loss_steps, profile=args.profile and p in SPEED_PRESETS))
    if not args.no_amp_naive:  # the same naive recipe as trl's SFTTrainer(bf16=True) runs it: autocast, bf16 adapters
        if args.naive_batch != 1:
            specs.append(dict(naive_best, name=f"naive+amp_{args.naive_batch}x{args.seq}", autocast=True,
                              profile=False))
        specs.append(dict(naive_1, name=f"naive+amp_1x{args.seq}", autocast=True, profile=False))
    if args.ablate:  # each lever of the ablation preset reverted alone, speed only, at one fixed micro-batch
        levers = [("lora_fused", False), ("liger_kernel", False), ("upcast_non_lora", True),
                  ("attn_implementation", "sdpa"), ("gradient_checkpointing", True), ("lora.dropout", 0.0)]
        p, mb = args.ablate, args.ablate_batch
        abl = dict(base, recipe=p, micro_batch=mb, seq=args.seq, loss_steps=0, speed_steps=2, warmup=1, ablation=True)
        if args.ablate_base:
            specs.append(dict(abl, name=f"{p}_{mb}x{args.seq}:as-is"))
        for k, v in levers:
            if not (args.tiny and k == "liger_kernel"):
                specs.append(dict(abl, name=f"{p}_{mb}x{args.seq}:{k}={v}", overrides={k: v}))
    return specs


def _fname(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _run_child(spec: dict[str, Any], work: Path, timeout: int) -> dict[str, Any]:
    spec_file = work / f"spec_{_fname(spec['name'])}.json"
    spec_file.write_text(json.dumps(spec))
    res_file = work / f"row_{_fname(spec['name'])}.json"
    res_file.unlink(missing_ok=True)
    env = {**os.environ, "SIGIL_BENCH_WORK": str(work), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "sigil_exp.bench", "--row", str(spec_file)], env=env, cwd=str(ROOT),
                       capture_output=True, text=True, timeout=timeout)
    (work / f"log_{_fname(spec['name'])}.txt").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if res_file.is_file():
        row = json.loads(res_file.read_text())
    else:
        tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
        row = {"name": spec["name"], "recipe": spec["recipe"], "status": "failed", "error": " | ".join(tail)}
    row["process_s"] = round(time.perf_counter() - t0, 1)
    return row


def _adapter_similarity(work: Path, ref: str, other: str) -> dict[str, float] | None:
    """How close two trained adapters are. Primary: the weight change each adapter makes,
    dW = B A per module (B starts at zero), compared over all modules with r x r products only:
    <B1 A1, B2 A2>_F = trace((B1^T B2)(A2 A1^T)). Also the raw A/B updates from the shared init."""
    import torch

    fr, fo, fi = work / f"adapter_{_fname(ref)}.pt", work / f"adapter_{_fname(other)}.pt", work / "adapter_init.pt"
    if not (fr.is_file() and fo.is_file() and fi.is_file()):
        return None
    r, o, i = torch.load(fr), torch.load(fo), torch.load(fi)
    rr = oo = ro = 0.0
    for ka in (k for k in r if "lora_A" in k):
        kb = ka.replace("lora_A", "lora_B")
        a1, b1, a2, b2 = r[ka].double(), r[kb].double(), o[ka].double(), o[kb].double()
        rr += float(torch.trace((b1.T @ b1) @ (a1 @ a1.T)))
        oo += float(torch.trace((b2.T @ b2) @ (a2 @ a2.T)))
        ro += float(torch.trace((b1.T @ b2) @ (a2 @ a1.T)))
    out = {"delta_w_cosine": round(ro / max(math.sqrt(rr * oo), 1e-30), 4),
           "delta_w_rel_diff": round(math.sqrt(max(rr + oo - 2 * ro, 0.0)) / max(math.sqrt(rr), 1e-30), 4),
           "delta_w_norm_ratio": round(math.sqrt(oo / max(rr, 1e-30)), 4)}
    for part in ("lora_A", "lora_B"):
        keys = [k for k in r if part in k]
        dr = torch.cat([(r[k] - i[k].float()).flatten() for k in keys])
        do = torch.cat([(o[k] - i[k].float()).flatten() for k in keys])
        out[f"{part}_update_cosine"] = round(float(torch.nn.functional.cosine_similarity(dr, do, dim=0)), 4)
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    v = {}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "liger-kernel"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = "-"
    return v


def summarise(rows: list[dict[str, Any]], args, shape: dict[str, int], work: Path) -> dict[str, Any]:
    naive_best = next((r for r in rows if r["recipe"] == "naive" and r.get("micro_batch", 0) == args.naive_batch
                       and not r.get("autocast")), None)
    naive_1 = next((r for r in rows if r["recipe"] == "naive" and r.get("micro_batch") == 1 and not r.get("autocast")),
                   None)
    naive_amp = next((r for r in rows if r["recipe"] == "naive" and r.get("autocast")
                      and r.get("micro_batch", 0) == args.naive_batch), None)
    naive_amp_1 = next((r for r in rows if r["recipe"] == "naive" and r.get("autocast") and r.get("micro_batch") == 1),
                       None)
    peaks = [r["peak_tflops_measured"] for r in rows if r.get("peak_tflops_measured")]
    peak = statistics.median(peaks) if peaks else None

    def tps(r):
        return (r or {}).get("speed", {}).get("tokens_per_s")

    ref_speed = tps(naive_best)
    for r in rows:
        if r.get("status") != "ok" or "speed" not in r:
            continue
        fl = flops_per_token(shape, r.get("lora_params", 0), r["seq"], r["hardware"]["gradient_checkpointing"])
        r["flops"] = fl
        t = tps(r)
        if peak:
            r["mfu"] = round(t * fl["model_flops_per_token"] / (peak * 1e12), 4)
            r["hfu"] = round(t * fl["hardware_flops_per_token"] / (peak * 1e12), 4)
        r["mfu_datasheet"] = round(t * fl["model_flops_per_token"] / (DATASHEET_TFLOPS * 1e12), 4)
        if ref_speed:
            r["ratio_vs_naive_best"] = round(t / ref_speed, 2)
        if tps(naive_1):
            r["ratio_vs_naive_mb1"] = round(t / tps(naive_1), 2)
        if tps(naive_amp):
            r["ratio_vs_naive_amp"] = round(t / tps(naive_amp), 2)
        if tps(naive_amp_1):
            r["ratio_vs_naive_amp_mb1"] = round(t / tps(naive_amp_1), 2)
    def agreement(r, ref):
        ls, rl = r["loss"]["losses"], ref["loss"]["losses"]
        rel = [abs(a - b) / abs(b) for a, b in zip(ls, rl, strict=False)]
        res = {"max_rel_diff": round(max(rel), 5), "mean_rel_diff": round(sum(rel) / len(rel), 5),
               "first_loss": ls[0], "last_loss": ls[-1], "ref_first": rl[0], "ref_last": rl[-1],
               "within_1pct": max(rel) <= 0.01}
        sim = _adapter_similarity(work, ref["name"], r["name"])
        if sim:
            res["adapter"] = sim
        return res

    amp_1_loss = naive_amp_1 if (naive_amp_1 or {}).get("loss") else None
    for r in rows:
        if not r.get("loss"):
            continue
        if naive_1 and naive_1.get("loss") and r is not naive_1:
            r["loss_agreement"] = agreement(r, naive_1)  # vs the naive recipe (fp32 adapters, no autocast)
        if amp_1_loss and r is not amp_1_loss and r["recipe"] != "naive":
            r["loss_agreement_vs_naive_amp"] = agreement(r, amp_1_loss)  # vs the same trainer path (bf16 adapters)
    targets: dict[str, Any] = {}
    speed_rows = [r for r in rows if r["recipe"] in SPEED_PRESETS and r.get("status") == "ok" and "speed" in r
                  and not r.get("ablation")]
    if speed_rows and ref_speed:
        best = max(speed_rows, key=tps)
        targets["speed"] = {"row": best["name"], "tokens_per_s": tps(best), "ratio": best.get("ratio_vs_naive_best"),
                            "ratio_vs_naive_amp": best.get("ratio_vs_naive_amp"), "mfu": best.get("mfu"), "met": bool(best.get("ratio_vs_naive_best", 0) >= 4
                                                                and (best.get("mfu") or 0) >= 0.5)}
    mem = next((r for r in rows if r["recipe"] == MEMORY_PRESET and r.get("status") == "ok" and "speed" in r
                and not r.get("ablation")), None)
    if mem and tps(naive_1):
        targets["memory"] = {"row": mem["name"], "peak_allocated_gb": mem.get("peak_allocated_gb"),
                             "tokens_per_s": tps(mem), "ratio_vs_naive_mb1": mem.get("ratio_vs_naive_mb1"),
                             "ratio_vs_naive_amp_mb1": mem.get("ratio_vs_naive_amp_mb1"),
                             "met": bool((mem.get("peak_allocated_gb") or 1e9) < 16
                                         and mem.get("ratio_vs_naive_mb1", 0) >= 2)}
    la = [r for r in rows if "loss_agreement" in r and r["recipe"] != "naive"]
    if la:
        targets["same_loss"] = {"met": all(r["loss_agreement"]["within_1pct"] for r in la), "rows": len(la),
                                "worst_max_rel_diff": max(r["loss_agreement"]["max_rel_diff"] for r in la)}
        lb = [r for r in la if "loss_agreement_vs_naive_amp" in r]
        if lb:
            targets["same_loss_vs_naive_amp"] = {
                "met": all(r["loss_agreement_vs_naive_amp"]["within_1pct"] for r in lb),
                "worst_max_rel_diff": max(r["loss_agreement_vs_naive_amp"]["max_rel_diff"] for r in lb)}
    return {"peak_tflops_measured": peak, "targets": targets}


def print_table(report: dict[str, Any]) -> None:
    rows = report["rows"]
    head = (f"{'row':<44}{'status':<9}{'mbxseq':>10}{'tok/s':>9}{'xnaive':>8}{'step s':>8}{'alloc GB':>9}"
            f"{'resv GB':>9}{'est GB':>8}{'est/meas':>9}{'MFU':>7}{'HFU':>7}{'loss Δmax':>10}{'tok/s@loss':>11}")
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        sp = r.get("speed", {})
        la = r.get("loss_agreement", {})
        mbs = f"{r.get('micro_batch', '?')}x{r.get('seq', '?')}"

        def f(v, fmt):
            return format(v, fmt) if isinstance(v, int | float) else "-"

        print(f"{r['name'][:43]:<44}{r.get('status', '?')[:8]:<9}{mbs:>10}{f(sp.get('tokens_per_s'), ',.0f'):>9}"
              f"{f(r.get('ratio_vs_naive_best'), '.2f'):>8}{f(sp.get('step_s'), '.3f'):>8}"
              f"{f(r.get('peak_allocated_gb'), '.1f'):>9}{f(r.get('peak_reserved_gb'), '.1f'):>9}"
              f"{f(r.get('estimate', {}).get('total_gb'), '.1f'):>8}{f(r.get('estimate_vs_measured'), '.2f'):>9}"
              f"{f(r.get('mfu'), '.1%'):>7}{f(r.get('hfu'), '.1%'):>7}"
              f"{f(la.get('max_rel_diff'), '.2%'):>10}{f(r.get('loss', {}).get('tokens_per_s'), ',.0f'):>11}")
        if r.get("status") not in ("ok", None):
            print(f"    {r.get('error', '')[:300]}")
    print(f"\npeak bf16 matmul measured: {report.get('peak_tflops_measured')} TFLOP/s; targets: "
          f"{json.dumps(report.get('targets'))}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(prog="python -m sigil_exp.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny Llama on the CPU: the code path in seconds")
    ap.add_argument("--presets", default=",".join(GPU_PRESETS), help="comma-separated hardware presets")
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="model shape (default 8b, or tiny)")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; tiny 64)")
    ap.add_argument("--long-seq", type=int, default=None, help=f"{MEMORY_PRESET}'s sequence length (default 8192)")
    ap.add_argument("--naive-batch", type=int, default=None, help="naive recipe's micro-batch (default 16)")
    ap.add_argument("--micro-batch", type=int, default=None, help="fix every speed preset's micro-batch (default: auto)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5)")
    ap.add_argument("--naive-steps", type=int, default=None, help="timed steps of the naive best row (default 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2)")
    ap.add_argument("--loss-steps", type=int, default=None, help="loss-agreement steps (default 30)")
    ap.add_argument("--loss-batch", type=int, default=1, help="sequences per loss-agreement step")
    ap.add_argument("--profile", action="store_true", help="profile one step of naive and the speed presets")
    ap.add_argument("--ablate", default=None, help="also run this preset with each lever reverted alone (speed only)")
    ap.add_argument("--ablate-batch", type=int, default=4, help="micro-batch of the ablation rows")
    ap.add_argument("--no-amp-naive", action="store_true", help="skip the naive recipe under bf16 autocast")
    ap.add_argument("--ablate-base", action="store_true", help="also the ablation preset as-is at --ablate-batch")
    ap.add_argument("--in-process", action="store_true", help="run rows in this process (default for --tiny)")
    ap.add_argument("--work-dir", default=None, help="model, tokens and per-row files (default /tmp/sigil_bench[_tiny])")
    ap.add_argument("--out", default=None, help="JSON report path (default <work-dir>/bench.json)")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--build-model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--row-timeout", type=int, default=900, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.build_model:  # child: make the random checkpoint on the GPU, then give the GPU back
        import torch

        build_random_model(json.loads(args.shape_json), Path(args.build_model),
                           "cuda" if torch.cuda.is_available() else "cpu")
        return None
    if args.row:  # child: one row
        import logging

        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        spec = json.loads(Path(args.row).read_text())
        try:
            row = run_row(spec)
        except Exception as e:  # the parent records it; the traceback goes to the row log
            traceback.print_exc()
            row = {"name": spec["name"], "recipe": spec["recipe"], "status": "failed", "error": f"{type(e).__name__}: {e}"}
        Path(spec["work_dir"], f"row_{_fname(spec['name'])}.json").write_text(json.dumps(row, default=str))
        return None

    tiny = args.tiny
    shape = dict(SHAPES[args.shape or ("tiny" if tiny else "8b")])
    if args.layers:
        shape["layers"] = args.layers
    args.seq = args.seq or (64 if tiny else 2048)
    args.long_seq = args.long_seq if args.long_seq is not None else (128 if tiny else 8192)
    args.naive_batch = args.naive_batch or (4 if tiny else 16)
    args.steps = args.steps if args.steps is not None else (2 if tiny else 5)
    args.naive_steps = args.naive_steps if args.naive_steps is not None else (2 if tiny else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    args.loss_steps = args.loss_steps if args.loss_steps is not None else (10 if tiny else 30)
    args.presets = [p for p in args.presets.split(",") if p]
    work = Path(args.work_dir or f"/tmp/sigil_bench{'_tiny' if tiny else ''}").expanduser()
    work.mkdir(parents=True, exist_ok=True)
    for f in list(work.glob("adapter_*.pt")) + list(work.glob("row_*.json")):
        f.unlink()
    os.environ["SIGIL_BENCH_WORK"] = str(work)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    threads = torch.get_num_threads()
    if tiny:  # tiny matmuls: extra threads only spin against each other (and against other jobs on CI)
        torch.set_num_threads(1)
    try:
        return _run_all(args, tiny, shape, work, argv)
    finally:
        torch.set_num_threads(threads)


def _run_all(args, tiny: bool, shape: dict[str, int], work: Path, argv) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    tag = "_".join(f"{k[0]}{v}" for k, v in shape.items())
    model_dir = work / f"model_{tag}"
    if not (model_dir / "config.json").is_file():
        if tiny or args.in_process or not torch.cuda.is_available():
            build_random_model(shape, model_dir)
        else:
            subprocess.run([sys.executable, "-m", "sigil_exp.bench", "--build-model", str(model_dir), "--shape-json",
                            json.dumps(shape)], check=True, cwd=str(ROOT))
    n_tok = args.loss_steps * args.loss_batch * args.seq
    ids, source = real_text_tokens(max(n_tok, 1), shape["vocab"])
    torch.save(torch.tensor(ids, dtype=torch.long), work / "tokens.pt")
    _log(f"real text: {len(ids)} tokens from {source}")

    specs = _row_specs(args, work, model_dir)
    out = Path(args.out) if args.out else work / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": "python -m sigil_exp.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "shape": shape, "seq": args.seq, "tiny": tiny, "versions": _versions(), "real_text": source,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not tiny else "cpu",
        "step": "faithful SFTTrainer step: trl collator, Trainer optimizer, bf16 autocast, clip, scheduler; "
                "grad_accum 1; wall clock with a device sync per step",
        "naive": "the naive recipe as measured in docs/gpu-baseline.md runs a plain step (fp32 adapters, no "
                 "autocast); naive+amp is the same recipe under bf16 autocast with bf16 adapters, as trl's "
                 "SFTTrainer(bf16=True) runs it",
        "flops": "model = 4N + 6 LoRA + causal attention (fwd+2x bwd); hardware adds the recomputed forward",
        "dequant_cache": "none: every row keeps only the 4-bit base weights and dequantises per matmul",
        "rows": [],
    }
    if tiny:
        report["tiny_overrides"] = "device=cpu, liger_kernel=false, optimizer=adamw_torch (CUDA-only otherwise)"
    rows = report["rows"]
    for spec in specs:
        _log(f"row {spec['name']} ...")
        if args.in_process or tiny:
            try:
                row = run_row(spec)
            except Exception as e:
                traceback.print_exc()
                row = {"name": spec["name"], "recipe": spec["recipe"], "status": "failed",
                       "error": f"{type(e).__name__}: {e}"}
            gc.collect()
        else:
            row = _run_child(spec, work, args.row_timeout)
        rows.append(row)
        sp = row.get("speed", {})
        _log(f"row {row['name']}: {row.get('status')} {sp.get('tokens_per_s', '-')} tok/s, "
             f"alloc {row.get('peak_allocated_gb', '-')} GB, est {row.get('estimate', {}).get('total_gb', '-')} GB "
             f"{row.get('error', '')[:200]}")
        report.update(summarise(rows, args, shape, work))
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(report, indent=2, default=str))  # after every row: a cut-short run still reports
    print_table(report)
    _log(f"report -> {out}")
    return report


if __name__ == "__main__":
    main()
