"""User-facing errors: short sentences that say what was wrong and what to do."""

import contextlib
import difflib
from collections.abc import Iterable, Iterator
from pathlib import Path


def did_you_mean(value: object, choices: Iterable[object], prefix: str = "",
                 cutoff: float = 0.6) -> str:
    """`` Did you mean '<prefix><closest>'?`` for the closest of ``choices``, or ""."""
    close = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1,
                                      cutoff=cutoff)
    return f" Did you mean '{prefix}{close[0]}'?" if close else ""


class MixmaskError(Exception):
    """A mistake in the user's input (config, dataset, checkpoint). The CLI prints the
    message without a traceback and exits with code 2."""


class ConfigError(MixmaskError):
    """An unknown, mistyped or invalid configuration value."""


class DatasetError(MixmaskError):
    """A dataset that is missing, corrupt or laid out in a way we cannot read."""


class CheckpointError(MixmaskError):
    """A checkpoint that is missing, corrupt or from an incompatible run."""


class IsolatedWorkFailed(MixmaskError):
    """Optional work run in a child process (:mod:`mixmask.pictures.isolated`) raised an unexpected
    error or crashed; the message says which and why."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint that carries Python objects beyond plain data (which could run code):
    refused by every command, never turned into a note."""


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[Path]:
    """``with writing(path) as path: ...`` writes an output file: its folder is made, and an
    OSError inside (full disk, no permission) becomes one MixmaskError sentence."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield path
    except OSError as error:
        raise MixmaskError(f"cannot write {path}: {error.strerror or error}.") from None
