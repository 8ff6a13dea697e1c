"""Stop requests: Ctrl-C (SIGINT), SIGTERM and SLURM's USR2 end a run with a checkpoint.

The handler only records the signal. The trainer asks at every step boundary, the ranks agree
(one all-reduce of the largest signal number), every rank finishes its step, they write a
checkpoint together and `fit` raises `StopRequested` carrying the signal. The launchers exit
with 128 + the signal number (130 for SIGINT, 143 for SIGTERM) after one line saying how to
resume. A second Ctrl-C raises KeyboardInterrupt at once (the checkpoint being written, if any,
stays incomplete and is never used). The SLURM job (dmm.train.slurm_job) uses the same class
with USR2 added, then asks submitit to requeue.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal."""
    return 128 + int(signum)


def resume_hint() -> str:
    return "to resume, run the same command again (or add --set train.resume=latest)"


class StopSignals:
    """A stop flag for the trainer: `flag()` is the number of the first stop signal received on
    this rank, 0 before. Handlers are in place only inside `installed()`."""

    def __init__(self, signals=DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.signum = 0

    def __call__(self) -> int:
        return self.signum

    def request(self, signum: int) -> None:
        """Ask for a stop as a signal would (tests, or a caller's own trigger)."""
        self.signum = self.signum or int(signum)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt(f"second {signal_name(signum)}: aborted without a checkpoint")
        if not self.signum:
            print(f"{signal_name(signum)} received: finishing this step, writing a checkpoint, then stopping"
                  + (" (Ctrl-C again aborts at once)" if signal.SIGINT in self.signals else ""),
                  file=sys.stderr, flush=True)
        self.request(signum)

    @contextlib.contextmanager
    def installed(self):
        """Handlers for `signals` while the block runs; the previous ones are put back after it.
        Signals can only be handled in the main thread: elsewhere this is a no-op."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in self.signals}
        for s in self.signals:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)


__all__ = ["DEFAULT_SIGNALS", "StopSignals", "exit_code", "resume_hint", "signal_name"]
