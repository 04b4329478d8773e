"""Rank and world of this process, and the one question every file and W&B write asks: `is_main()`.

A run started with `hardware.nproc_per_node` / `hardware.nnodes` > 1 runs one worker process per GPU
(started by torch's elastic launcher, see `sigil_exp.launch`); each worker holds its own 4-bit base and
LoRA adapter, and the trainer (accelerate's DDP) all-reduces the LoRA gradients. Only the main process
(global rank 0) writes the run folder and the W&B run. A single-process run is rank 0 of a world of 1.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True in a single-process run and in global rank 0 of a multi-process one."""
    return rank() == 0


def is_worker() -> bool:
    """True in a process started by torch's elastic launcher (torchrun or `sigil_exp.launch`)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def init(device: str) -> None:
    """Join the process group before anything collective (data, model, trainer). NCCL on CUDA (each
    rank on GPU `local_rank`), gloo on the CPU. The trainer (accelerate) reuses this group."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" and torch.cuda.is_available() else "gloo"
        kwargs = {"device_id": torch.device("cuda", local_rank())} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (e.g. builds and caches the datasets); the others run it
    after, and find its results (the cache) instead of redoing the work side by side."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def reduce_max(value: float | None) -> float | None:
    """The largest value over all ranks (e.g. peak memory per GPU); the value itself in one process."""
    import torch
    import torch.distributed as dist

    if value is None or not (dist.is_available() and dist.is_initialized()):
        return value
    device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def device_map(device: str) -> dict[str, int] | str:
    """Where `from_pretrained` puts the whole model: this rank's GPU, or the CPU."""
    return {"": local_rank()} if device == "cuda" else "cpu"


def time_allreduce(numel: int, reps: int = 10) -> float | None:
    """Milliseconds one all-reduce of `numel` fp32 values takes across the ranks now (the size of the
    LoRA gradients DDP reduces each step); None in a single process. Collective: every rank calls it."""
    import time

    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or world_size() <= 1:
        return None
    device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = torch.ones(numel, dtype=torch.float32, device=device)
    dist.all_reduce(buf)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(buf)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def agree(value: int) -> int:
    """The largest `value` over the ranks (e.g. a stop request one rank saw): every rank then acts on the
    same step. The value itself in one process. Collective: every rank calls it."""
    import torch
    import torch.distributed as dist

    if world_size() <= 1 or not (dist.is_available() and dist.is_initialized()):
        return value
    device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
