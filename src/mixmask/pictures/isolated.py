"""Optional work in a child process, so that nothing it does can take down the caller.

Pictures at the end of a run call into matplotlib, scikit-learn and the run's data; a
crash in there (scikit-learn 1.9's t-SNE segfaults on identical rows) would otherwise kill
a process whose run trained and saved. Here the work runs in a fresh *spawned* interpreter
(fork is unsafe once CUDA or torch's thread pools are up): an exception comes back as one
sentence, a crash as the signal that ended the child; the caller decides whether that is
a note (the end of a pretraining run) or exit 2 (``mixmask plot``).
"""

from __future__ import annotations

import multiprocessing
import signal
import traceback
from collections.abc import Callable
from typing import Any

from mixmask import errors
from mixmask.errors import IsolatedWorkFailed, MixmaskError


def run_isolated(function: Callable[..., Any], *args: Any, what: str, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` in a spawned child process; its return value. The
    function and its arguments travel by pickle: a module-level function and plain values.
    Raises IsolatedWorkFailed naming ``what`` when the child raises or dies."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    # Not a daemon: the work may start DataLoader workers of its own, which a daemonic
    # process may not; the parent waits for it in any case.
    child = context.Process(target=_child, args=(sender, function, args, kwargs),
                            name=f"mixmask {what}", daemon=False)
    child.start()
    sender.close()  # the child holds the only writer: EOF once it exits
    try:
        outcome = receiver.recv()
    except EOFError:
        outcome = None
    finally:
        child.join()
        receiver.close()
    if outcome is None:
        raise IsolatedWorkFailed(f"{what} crashed ({_death(child.exitcode)}); nothing "
                                 "else was affected.")
    kind, value = outcome
    if kind == "mixmask":  # a user-facing error: raised again as the class it was
        name, message = value
        error_class = getattr(errors, name, None)
        if not (isinstance(error_class, type) and issubclass(error_class, MixmaskError)):
            error_class = MixmaskError
        raise error_class(message)
    if kind == "error":
        raise IsolatedWorkFailed(f"{what} failed: {value}")
    return value


def _child(sender, function, args, kwargs) -> None:
    try:
        result = ("ok", function(*args, **kwargs))
    except MixmaskError as error:
        result = ("mixmask", (type(error).__name__, str(error)))
    except Exception as error:  # noqa: BLE001 - reported to the parent as one sentence
        where = traceback.extract_tb(error.__traceback__)[-1]
        result = ("error", f"{type(error).__name__}: {error} (in {where.name}, "
                           f"{where.filename.rsplit('/', 1)[-1]}:{where.lineno})")
    sender.send(result)
    sender.close()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the process was killed by {name}"
    return f"the process exited with code {exitcode} before answering"
