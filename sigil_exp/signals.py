"""Ctrl-C, SIGTERM and launcher preemption: stop at a step boundary with a checkpoint, then say how to go on.

During training the first SIGINT or SIGTERM lets the trainer finish its step, save a checkpoint and
stop; the run is marked `interrupted` (metrics.json, W&B) and one line gives the command that resumes
it. The process exits with 128 + the signal number: 130 for Ctrl-C (SIGINT), 143 for SIGTERM (what
SLURM sends on preemption and time limits). A second signal aborts at once (same exit codes); outside
training (loading, evaluation) the first one does. Under submitit (`hydra/launcher=submitit_local`,
`local_gpus`, `slurm`) its preemption signal (USR2, or $SUBMITIT_PREEMPT_SIGNAL) stops the same way and
is then handed back to submitit, which requeues the job; the restarted job continues the run.

Signal handlers are process-wide, so the stop request is too (one run per process at a time).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger(__name__)


class RunInterrupted(BaseException):
    """A signal stopped the run. A BaseException, so that a sweep's `except Exception` cannot swallow it."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None, recorded: bool = False):
        self.signum, self.step, self.checkpoint, self.recorded = signum, step, checkpoint, recorded
        self.previous: Any = None  # the handler installed before ours (submitit's requeue hook, say)
        where = f" at step {step} ({checkpoint} saved)" if checkpoint else " without a final save (earlier checkpoints stay)"
        super().__init__(f"stopped by {self.name}{where}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Stop:
    graceful = False  # inside trainer.train(): the first signal asks for a stop at the next step boundary
    signum: int | None = None


STOP = _Stop()


def _handler(signum: int, frame: Any) -> None:
    if STOP.graceful and STOP.signum is None:
        STOP.signum = signum
        log.warning("%s: stopping after this step and saving a checkpoint (send it again to abort at once)",
                    signal.Signals(signum).name)
        return
    raise RunInterrupted(signum)


def _signals() -> list[int]:
    sigs = [signal.SIGINT, signal.SIGTERM]
    preempt = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG"), None)
    if preempt is not None and preempt not in sigs and callable(signal.getsignal(preempt)):
        sigs.append(preempt)  # a launcher (submitit) listens for it: stop cleanly first, then hand it over
    return sigs


@contextmanager
def handled():
    """While active, the signals raise RunInterrupted (or, inside `graceful()`, request a stop); the previous
    handlers come back afterwards. Does nothing outside the main thread (Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _signals()}
    for s in previous:
        signal.signal(s, _handler)
    try:
        yield
    except RunInterrupted as e:
        e.previous = previous.get(e.signum)  # the outermost context sets it last: the launcher's, if any
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def graceful():
    """Around trainer.train(): the first signal sets STOP.signum, which StopOnSignal turns into save + stop."""
    with handled():
        STOP.graceful, STOP.signum = True, None
        try:
            yield STOP
        finally:
            STOP.graceful = False


class StopOnSignal(TrainerCallback):
    """At the end of the step during which a stop was requested: save a checkpoint, then stop training."""

    def on_step_end(self, args, state, control, **kw):
        from sigil_exp.distributed import agree

        signum = agree(STOP.signum or 0)  # data parallel: all ranks stop (and save) at the same step
        if signum:
            STOP.signum = STOP.signum or signum
            control.should_save = True
            control.should_training_stop = True


def hand_back(e: RunInterrupted) -> None:
    """Give the signal to the handler that was there before ours (submitit's requeue hook exits the
    process after requeueing the job); nothing for Python's own Ctrl-C or the default action."""
    if callable(e.previous) and e.previous is not signal.default_int_handler:
        e.previous(e.signum, None)
