"""Preemption: SIGTERM / SIGINT become a flag the training loop polls, so it can save a run checkpoint and exit 0
(re-exported by checkpoint/run.py, whose checkpoints make the resume exact)."""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any


class PreemptionHandler:
    """Turns SIGTERM / SIGINT into a flag the training loop polls (`should_stop()`), so it can save and exit 0.

    Use as a context manager (or `install()` / `uninstall()`); the previous handlers come back on exit. A
    second signal while the flag is set runs the previous handler (e.g. Ctrl-C twice still interrupts).
    Signal handlers can only be set from the main thread; elsewhere this installs nothing and never stops.
    """

    def __init__(self, callback: Callable[[int], None] | None = None,
                 signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.callback = callback
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def should_stop(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            previous = self._previous.get(signum, signal.SIG_DFL)
            self.uninstall()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(signum)
            return
        self.signum = signum
        if self.callback is not None:
            self.callback(signum)

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def preemption_guard(callback: Callable[[int], None] | None = None) -> PreemptionHandler:
    """`with preemption_guard() as stop: ... if stop.should_stop(): save; break` (a `PreemptionHandler`)."""
    return PreemptionHandler(callback)


__all__ = ["PreemptionHandler", "preemption_guard"]
