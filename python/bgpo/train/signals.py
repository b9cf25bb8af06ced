"""SIGINT/SIGTERM: a run stops cleanly, and says so with its exit code.

``bgpo train`` installs ``StopSignals`` before it does anything else.  During start-up (reading the
config, building the model, loading data) a signal raises ``StoppedBySignal`` at once: nothing has
been trained and nothing is saved.  Inside ``StopSignals.deferred()`` (the warm-up and the RL loop) a
signal is only recorded: the trainer finishes the step, checkpoints (RL) and stops.  Either way the
process exits with ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM): the code a shell reports
for a process killed by that signal, so a scheduler sees "stopped, resumable" whether the signal came
before the handler was installed or after.
"""
from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["StopSignals", "StoppedBySignal", "signal_exit_code", "SIGNALS"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_exit_code(signum: int) -> int:
    """The exit code of a run stopped by ``signum``: 128 + its number."""
    return 128 + int(signum)


class StoppedBySignal(BaseException):
    """A signal arrived during start-up (a BaseException, like KeyboardInterrupt: ``except Exception``
    in start-up code does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} during start-up")
        self.signum = int(signum)


class StopSignals:
    """Handles SIGINT and SIGTERM (main thread only; elsewhere ``install`` does nothing).

    ``signum`` is the first signal received (None if none)."""

    def __init__(self):
        self.signum: int | None = None
        self._deferred = False
        self._previous: dict = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = int(signum)
        if not self._deferred:
            raise StoppedBySignal(signum)

    @contextlib.contextmanager
    def deferred(self):
        """Signals are recorded, not raised, inside this block (the caller polls ``signum``)."""
        self._deferred = True
        try:
            yield self
        finally:
            self._deferred = False
