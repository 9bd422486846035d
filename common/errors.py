"""One exception family, so the CLI turns every user-facing failure into a one-line message."""


class CmbenchError(Exception):
    """A failure the user can fix; the message names the thing and the fix."""


class ConfigError(CmbenchError):
    """A config file has an unknown key or a bad value."""


class DataError(CmbenchError):
    """A data file is missing or is not in the expected format."""


class CheckpointError(CmbenchError):
    """A checkpoint is missing, corrupt or does not match the run."""


class TrainingError(CmbenchError):
    """Training cannot go on (e.g. non-finite losses)."""
