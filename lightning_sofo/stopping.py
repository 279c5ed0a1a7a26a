"""Stopping a multi-process run with a signal, at one step boundary on every rank.

Lightning's own SIGTERM handler broadcasts from inside the signal handler, so on several
processes that collective can interleave with the all-reduce of a SOFO step and every rank
waits for good. `GracefulStop` replaces it while `sofo_ddp` trains: the handler only records the
request, the request rides along in the step's own all-reduce (one more number), and every rank
learns of it after the same step and sets `trainer.should_stop`, Lightning's public way to end a
fit at a step boundary. The fit then ends as any fit does (the final validation, last.ckpt
written at the step reached) and the process exits 0. A second signal stops at once, without a
checkpoint: rank 0 kills the processes it launched, and each process ends as the signal's default
action would end it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """The stop request of one process. `requested` is read by the strategy's all-reduce;
    `stop_after_this_step(trainer)` is called on every rank once any rank has asked."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._rank = 0
        self._launcher = None

    def install(self, rank: int, launcher: Any = None) -> None:
        """Take over SIGTERM and SIGINT (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        self.requested, self.signal_name, self._rank, self._launcher = False, None, rank, launcher
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        """Give the signals back to whoever held them before install."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:  # the second signal: stop now, as the signal's default action would
            sys.stderr.write(f"[rank {self._rank}] {name} again: stopping now, without a checkpoint.\n")
            kill = getattr(self._launcher, "kill", None)
            if self._rank == 0 and kill is not None:
                kill(signal.SIGKILL)  # the processes this one launched, which may be waiting on it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested, self.signal_name = True, name
        sys.stderr.write(f"[rank {self._rank}] {name}: every rank stops after the current step and writes "
                         f"last.ckpt ({name} again stops at once).\n")

    def stop_after_this_step(self, trainer: L.Trainer) -> None:
        if not trainer.should_stop:
            rank_zero_info(f"Stopped by a signal ({self.signal_name or 'on another rank'}): every rank stops after "
                           f"step {trainer.global_step + 1}; last.ckpt is written there. Resume with --ckpt_path last.")
        trainer.should_stop = True
