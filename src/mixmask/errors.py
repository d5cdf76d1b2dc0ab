"""User-facing errors: short sentences that say what was wrong and what to do."""


class MixmaskError(Exception):
    """A mistake in the user's input (config, dataset, checkpoint). The CLI prints the
    message without a traceback and exits with code 2."""


class ConfigError(MixmaskError):
    """An unknown, mistyped or invalid configuration value."""


class DatasetError(MixmaskError):
    """A dataset that is missing, corrupt or laid out in a way we cannot read."""


class CheckpointError(MixmaskError):
    """A checkpoint that is missing, corrupt or from an incompatible run."""
