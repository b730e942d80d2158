"""Preemption (SLURM's SIGTERM, Ctrl-C): write ``last.ckpt`` at the step boundary, stop, say so.

Lightning already handles SIGTERM this way: its handler only notes the signal
(``trainer.received_sigterm``), the running optimiser step finishes, and the training loop then
raises ``SIGTERMException`` at the step boundary, calls the callbacks' ``on_exception`` and
restores the signal handlers it replaced. :class:`CheckpointOnSignal` adds what a resumable job
needs on top:

- ``on_exception`` writes ``last.ckpt`` of that boundary, so a relaunch loses no step;
- Ctrl-C (SIGINT) takes the same path, instead of Lightning's ``KeyboardInterrupt`` handling,
  which may stop in the middle of an optimiser step and exits the process;
- a signal that arrives while the Trainer sets up or restores a checkpoint, before Lightning's
  handler is in place, is held and passed on as soon as training starts.

``fit`` then raises :class:`TrainingInterrupted`, so the job exits non-zero.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(RuntimeError):
    """Training stopped before its last step (a signal, or Lightning stopped early).

    ``checkpoint`` is ``last.ckpt``, from which a rerun of the same job resumes; ``signum`` is the
    signal received, if any (an entry point may exit with ``128 + signum``, as the shell does).
    """

    def __init__(self, message: str, *, checkpoint: Path, signum: int | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.signum = signum


class CheckpointOnSignal(Callback):
    """On SIGTERM or SIGINT during :meth:`holding_signals`, stop at the step boundary and write ``checkpoint``.

    ``signum`` is the first signal received. Further signals change nothing (the step still
    finishes and is written); SIGKILL remains the way to stop at once.
    """

    def __init__(self, checkpoint: str | Path):
        self.checkpoint = Path(checkpoint)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @contextmanager
    def holding_signals(self):
        """Note SIGTERM and SIGINT instead of acting on them inside the block; then restore the handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield  # Python delivers signals to the main thread only: nothing to hold here
            return
        self._previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self._note)
        try:
            yield
        finally:
            for s, handler in self._previous.items():
                if handler is not None:  # None: a handler not installed from Python, left as it is
                    signal.signal(s, handler)
            self._previous = {}

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's SIGTERM handler is in place by now (it calls ours too, and Lightning restores
        # SIGINT with the others when it tears down). Route Ctrl-C to it, and pass on a held signal.
        lightning_handler = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread() or not callable(lightning_handler):
            return
        signal.signal(signal.SIGINT, lightning_handler)
        if self.signum is not None and lightning_handler != self._note:
            lightning_handler(self.signum, None)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Only Lightning's own stop is at a step boundary; any other exception may be mid-step,
        # and then the last periodic checkpoint is the one to resume from.
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.checkpoint)

    def __getstate__(self) -> dict[str, Any]:
        # Spawned ranks get a copy of the callbacks; signal handlers do not travel between processes.
        return {**self.__dict__, "_previous": {}}
