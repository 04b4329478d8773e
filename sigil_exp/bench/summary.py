"""The benchmark report: ratios against the naive recipe, MFU, loss and adapter agreement, targets, the table."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from sigil_exp.bench.configs import DATASHEET_TFLOPS, MEMORY_PRESET, SPEED_PRESETS, _fname
from sigil_exp.throughput import flops_per_token


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


