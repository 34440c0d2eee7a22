"""The errors the `train` and `export` commands turn into one clear line and a non-zero exit."""


class TrainingError(Exception):
    """Base class: its message is shown to the user as is, without a traceback."""


class CorpusError(TrainingError):
    """A corpus path is missing, unreadable, not UTF-8, empty, or fails its checksum."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, truncated, corrupt, or does not match the run."""


class ExportError(TrainingError):
    """Export failed: ONNX checker, tracing, or the output folder."""


class ParityError(ExportError):
    """Eager, TorchScript and ONNX Runtime disagree beyond the tolerance."""


class Interrupted(TrainingError):
    """SIGINT or SIGTERM stopped training after it saved its state; `exit_status` is 128 + the
    signal (130, 143), what a shell reports for a process the signal ended."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class Terminated(BaseException):
    """SIGTERM (what `docker stop` sends) during export. A BaseException, as KeyboardInterrupt
    is, so that no `except Exception` swallows it and every cleanup on the way out runs."""
