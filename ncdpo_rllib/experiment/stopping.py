"""SIGINT / SIGTERM during a long command (``train``, ``pretrain``): stop at the next safe point."""

from __future__ import annotations

import contextlib
import signal
import threading


class StopRequest:
    """The first SIGINT / SIGTERM lets the current unit of work (an iteration, a gradient step)
    finish, then the command saves what it needs to resume and stops (``signal`` is set); a second
    aborts at once (KeyboardInterrupt), leaving the last complete save as it was. Handlers are
    installed in the main thread only and restored on exit."""

    def __init__(self, log, unit: str = "iteration"):
        self.log, self.unit, self.signal, self._previous = log, unit, None, {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        self.log(f"{self.signal}: finishing this {self.unit}, then a checkpoint and stop (send it again to abort now)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@contextlib.contextmanager
def interruptible():
    """SIGTERM as well as SIGINT raises KeyboardInterrupt inside the block (work that has no safe
    point to stop at, e.g. an evaluation or the recording of datasets, is abandoned at once and the
    caller cleans up); the previous handlers come back after. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
