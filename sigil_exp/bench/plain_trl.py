"""What a user writes instead of sigil_exp: a plain trl SFTTrainer QLoRA script (the benchmark's
reference row). NF4 + double quant + bf16 compute, prepare_model_for_kbit_training, LoRA r16/a16/0.05
on all 7 projections, packing, bf16, non-reentrant checkpointing, paged AdamW 8-bit, micro-batch 4.

    python -m sigil_exp.bench.plain_trl --model DIR --data rows.jsonl --steps 8 --out result.json

Only the measurement (a step clock, the same steady-state rule as sigil_exp's own runs) is ours.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m sigil_exp.bench.plain_trl")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="{prompt, gen} JSONL")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="the same script on the CPU (the benchmark's --tiny)")
    args = ap.parse_args(argv)

    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sigil_exp.throughput import StepClock

    # ---- the script a user writes
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map="cpu" if args.cpu else {"": 0}, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ds = load_dataset("json", data_files=args.data, split="train")
    ds = ds.map(lambda r: {"prompt": r["prompt"], "completion": r["gen"]}, remove_columns=ds.column_names)
    cfg = SFTConfig(output_dir=str(Path(args.out).parent / "plain_trl_out"), max_steps=args.steps,
                    per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=1,
                    learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, bf16=True,
                    use_cpu=args.cpu, packing=True, max_length=args.seq, gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": False},
                    optim="adamw_torch" if args.cpu else "paged_adamw_8bit", logging_steps=1, save_strategy="no",
                    report_to="none", include_num_input_tokens_seen="non_padding", disable_tqdm=True)

    # ---- the measurement
    clock = StepClock("cpu" if args.cpu else "cuda")

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            clock.begin(state.num_input_tokens_seen)

        def on_step_end(self, a, state, control, **kw):
            clock.end(state.num_input_tokens_seen)

    if not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, peft_config=lora, processing_class=tok,
                         callbacks=[Clock()])
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    result = {**clock.steady(), "train/loss_first": losses[0] if losses else None,
              "sys/peak_mem_gb": None if args.cpu else torch.cuda.max_memory_allocated() / 1e9,
              "derived/micro_batch_size": args.micro_batch, "derived/grad_accum": 1, "train/steps": trainer.state.global_step}
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
