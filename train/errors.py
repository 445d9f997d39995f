"""The errors a user can fix, shared by every command: printed as one line, never as a traceback."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad option value (command line, YAML or checkpoint config): exit 2, one line."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""
