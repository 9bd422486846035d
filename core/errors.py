"""One exception family, so the CLI turns every user-facing failure into a one-line message."""


class CmbenchError(Exception):
    """A failure the user can fix; the message names the thing and the fix."""


class ConfigError(CmbenchError):
    """A config file has an unknown key or a bad value."""


class BadValue(ValueError):
    """A parameter outside its allowed range; carries the field name so the config loader builds the dotted key
    (`methods.ctm.params.gamma: must lie in [0, 1]`) and the CLI prints one line."""

    def __init__(self, key: str, msg: str):
        super().__init__(msg)
        self.key = key


def require(cond: bool, key: str, msg: str) -> None:
    """Validate a dataclass field in `__post_init__`: every config and method parameter is checked this way."""
    if not cond:
        raise BadValue(key, msg)


class DataError(CmbenchError):
    """A data file is missing or is not in the expected format."""


class CheckpointError(CmbenchError):
    """A checkpoint is missing, corrupt or does not match the run."""


class TrainingError(CmbenchError):
    """Training cannot go on (e.g. non-finite losses)."""


class OutputError(CmbenchError):
    """An output file cannot be written (read-only folder, disk full); what was there before is intact."""


PREEMPTED_EXIT_STATUS = 75  # sysexits EX_TEMPFAIL: "try again later"; any nonzero status makes Snakemake retry


class Preempted(CmbenchError):
    """SIGTERM or SIGUSR1 arrived: a checkpoint was written at a step boundary; rerun the command to resume."""

    exit_status = PREEMPTED_EXIT_STATUS
