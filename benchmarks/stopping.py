"""Benchmarks stopped by a time limit still write their JSON (what they measured so far).

``timeout --signal=TERM`` (benchmarks/gpu_suite.sh) sends SIGTERM: inside a pretraining
run the engine stops at the next step boundary and raises ``RunStopped``; elsewhere
:func:`stoppable` turns the signal into :class:`Stopped` where the benchmark can catch it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator


class Stopped(BaseException):
    """A signal asked the benchmark to stop; the message names it. A BaseException, like
    KeyboardInterrupt, so a benchmark's ``except Exception`` does not swallow it."""


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """SIGTERM (and SIGINT) raise :class:`Stopped` inside the block."""

    def stop(signum, frame):
        raise Stopped(f"stopped by {signal.Signals(signum).name}")

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM,
                                                                   signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def measure_until_stopped(measure: Callable[[], None], notes: list[str], kept: str) -> str | None:
    """Run ``measure`` (which fills the benchmark's rows as it goes); a stop signal ends it
    with a note that the results are partial (``kept``: what they hold). Returns the
    signal's sentence, or None when it ran to the end."""
    try:
        with stoppable():
            measure()
    except Stopped as stop:
        notes.append(f"{stop}: partial results, {kept}")
        print(f"note: {notes[-1]}", flush=True)
        return str(stop)
    return None
