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
