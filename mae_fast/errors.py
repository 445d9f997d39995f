"""Every error a user can fix, defined here once: each command prints one as one line ``<command>: error: ...``
(exit 2 for a bad option, 1 for a failure while running), never as a traceback."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad option value (command line, YAML or checkpoint config): exit 2, one line."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the message names file, key and shapes."""


class MemoryPlanError(ValueError):
    """No configuration fits the memory budget (one line: the prediction and what to try)."""


class ConvertError(CheckpointError):
    """A conversion that cannot be done as asked; the message names the path and the reason."""


class DeviceError(ValueError):
    """The requested device cannot be used here (one line, naming the option and the way out)."""


class UnreadableImageError(RuntimeError):
    """An image file that cannot be decoded (raised with strict=True)."""


#: why an unreadable image stops the run, and how to skip such files instead, in the command-line flags' words
STRICT_DATA_HINT = "--strict-data; drop it or pass --no-strict-data to skip unreadable files with a warning"


class NoReadableImagesError(UnreadableImageError):
    """Every image file of a source is unreadable (the message names the source and the count)."""


class ShardError(ValueError):
    """A shard source that cannot be used (the message names the pattern, file or shard)."""
