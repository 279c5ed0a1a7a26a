"""Checkpoints and stopping: last.ckpt always holds the state at the end of fit, and a run stopped by
a signal (or by a non-finite step) writes it before it exits."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, whose last.ckpt always holds the state at the end of fit.

    ModelCheckpoint(save_last=True) writes last.ckpt when it saves at a validation, and at the end
    of fit only if it never wrote one: a fit of 7 steps validated at step 5 would leave step 5's
    state in last.ckpt, and resume, test, predict and lightning_sofo.load would all use it. This
    one also writes last.ckpt at the end of fit whenever the last checkpoint written is older
    than the step reached (save_last is True by default here)."""

    def __init__(self, *args: Any, save_last: bool | str = True, **kwargs: Any):
        super().__init__(*args, save_last=save_last, **kwargs)
        self.step_saved = -1  # the global step of the last checkpoint the Trainer wrote

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        self.step_saved = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_train_end(trainer, module)
        if not self.save_last or self.dirpath is None or trainer.fast_dev_run or trainer.global_step == self.step_saved:
            return
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(str(path))  # every rank takes part; rank 0 writes (atomically, by the strategy)
        self.last_model_path = str(path)


class CheckpointOnInterrupt(L.Callback):
    """Stopping a run by SIGTERM (a scheduler's preemption, `kill`) or SIGINT (Ctrl-C) finishes the
    current step, writes the Trainer's last checkpoint (ModelCheckpoint's last.ckpt) at that step,
    and exits cleanly, so `--ckpt_path last` resumes exactly there. During fit, SIGINT is turned
    into SIGTERM (Lightning's own graceful stop at a step boundary); a second Ctrl-C stops at once.
    Under sofo_ddp the strategy handles both signals itself (lightning_sofo.stopping) and this
    callback stands aside. A FloatingPointError (SOFO's on_nonfinite="raise") also writes
    last.ckpt first: the state of the last good step. SIGKILL cannot be caught: a run killed that
    way resumes from the last checkpoint written (atomically, so that one is whole)."""

    def __init__(self):
        self._previous_handler = None
        self._interrupts = 0
        self._rank = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if getattr(trainer.strategy, "graceful_stop", None) is not None:
            return  # the strategy stops every rank at one step itself (sofo_ddp: lightning_sofo.stopping)
        if threading.current_thread() is threading.main_thread():
            self._interrupts, self._rank = 0, trainer.global_rank
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self._rank != 0:
            # Ctrl-C reaches every process of the job; rank 0 alone turns it into SIGTERM, which
            # Lightning passes on to the other ranks (one stop, taken by all at the same step)
            return
        self._interrupts += 1
        if self._interrupts > 1:  # a second Ctrl-C: stop now, as Python would
            raise KeyboardInterrupt
        rank_zero_info("Ctrl-C: stopping after the current step and writing a checkpoint (Ctrl-C again to stop now).")
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self._restore_handler()
        checkpoint = trainer.checkpoint_callback
        nonfinite = isinstance(exception, FloatingPointError)  # on_nonfinite="raise": the parameters are untouched
        if not (isinstance(exception, SIGTERMException) or nonfinite) or checkpoint is None or checkpoint.dirpath is None:
            return
        name = getattr(checkpoint, "CHECKPOINT_NAME_LAST", "last") + checkpoint.FILE_EXTENSION
        trainer.save_checkpoint(str(Path(checkpoint.dirpath) / name))
        if nonfinite:
            rank_zero_info(f"Stopped at a non-finite step (on_nonfinite='raise'); the last good state, after step "
                           f"{trainer.global_step}, is written to {Path(checkpoint.dirpath) / name} (the trial stream "
                           "is past the batch that failed). Resume with --ckpt_path last and other settings.")
            return
        rank_zero_info(f"Stopped by a signal after step {trainer.global_step}; checkpoint written to "
                       f"{Path(checkpoint.dirpath) / name}. Resume with --ckpt_path last.")
