"""One benchmark row in its own process: build the configuration with the functions train() uses and
time a faithful copy of the SFTTrainer step on random tokens (speed) and on real text (loss)."""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sigil_exp.bench.configs import _fname, row_config


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
    from sigil_exp.config import SigilError
    from sigil_exp.preflight import ModelShape, check_fits, memory_budget
    from sigil_exp.validation import validate

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


