"""Which training rows make each optimizer step: full global batches, the same at any GPU count.

The trainer's default shuffles each epoch and ends it with a short step (the rows left over). Under
DDP accelerate then pads that step with repeated rows so every rank gets a batch, while one GPU takes
the short step as it is: a 1-GPU and an N-GPU run at the same global batch stop training on the same
rows at every epoch end, and on a small set (or a long run of many epochs) the runs drift apart.
`WholeStepSampler` shuffles exactly as the trainer does (the same seeded permutation per epoch) and
drops each epoch's remainder, under one global batch, so every step is micro-batch x grad_accum x
world rows and step k holds the same rows on 1 GPU and on N (torchtune and axolotl drop it too).
Over epochs every row is seen: each epoch draws a new permutation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


class WholeStepSampler(Sampler[int]):
    """A seeded shuffle of `n` rows (epoch e uses seed + e, as accelerate's seedable sampler does),
    cut to a multiple of `global_batch`. With fewer rows than one global batch nothing is cut (one
    short step per epoch rather than none)."""

    def __init__(self, n: int, global_batch: int, seed: int):
        self.n, self.global_batch, self.seed, self.epoch = n, global_batch, seed, 0
        whole = n - n % global_batch
        self.length = whole if whole > 0 else n

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.n, generator=generator)[: self.length].tolist()
        self.epoch += 1  # the trainer sets the epoch too (resume); this keeps a bare loop reshuffling

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def use_whole_steps(trainer) -> None:
    """Make `trainer` draw its training rows from a `WholeStepSampler` over its (packed) train set."""

    def train_sampler(train_dataset=None) -> WholeStepSampler:
        dataset = train_dataset if train_dataset is not None else trainer.train_dataset
        args = trainer.args
        global_batch = args.train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        sampler = WholeStepSampler(len(dataset), global_batch, args.data_seed if args.data_seed is not None else args.seed)
        if sampler.length < len(dataset):
            log.info("Each epoch: %d steps of %d rows; the %d rows left over in an epoch's shuffle wait for the next "
                     "(full steps: the same rows per step on any GPU count)", sampler.length // global_batch,
                     global_batch, len(dataset) - sampler.length)
        return sampler

    trainer._get_train_sampler = train_sampler
