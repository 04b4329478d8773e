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

from sigil_exp.bench.configs import SHAPES, build_random_model, compose_preset, naive_config  # noqa: F401
from sigil_exp.throughput import flops_per_token  # noqa: F401


def main(argv=None):
    from sigil_exp.bench.cli import main as _main

    return _main(argv)
