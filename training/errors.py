"""Project exceptions: every user mistake becomes one of these, and the CLIs turn it
into a single `error: ...` line with exit status 2 (like argparse), never a traceback."""


class TrainingError(Exception):
    """Base class for errors caused by bad input rather than by a bug."""


class ConfigError(TrainingError):
    """A flag has a value outside its allowed range, or flags contradict each other."""


class DataError(TrainingError):
    """--data names nothing readable, or the files hold no text."""


class ModelError(TrainingError):
    """The model directory is missing, unreadable or of an unsupported architecture."""


class CheckpointError(TrainingError):
    """A checkpoint to resume from is missing, incomplete or corrupt."""


class OutputError(TrainingError):
    """The output directory cannot be used (e.g. it is not empty and --overwrite is off)."""
