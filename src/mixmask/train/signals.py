"""Stopping a run at a step boundary: SIGINT and SIGTERM, or a flag a caller holds."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopSignals:
    """SIGINT and SIGTERM (Ctrl-C; what SLURM and Kubernetes send) ask the loop to stop at
    the next step boundary, where the run's state is whole, so the checkpoint saved there
    resumes exactly; a second SIGINT interrupts at once. Outside the main thread (where
    Python cannot install handlers) signals keep their default behaviour."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class GivenStop:
    """A stop flag given by the caller (tests), in place of the signal handlers: an object
    whose ``received`` names the signal once the run should stop."""

    def __init__(self, stop):
        self.stop = stop

    def __enter__(self):
        return self.stop

    def __exit__(self, *exc) -> None:
        return None
