"""One exception root for everything avg-edge raises on purpose.

Messages say what was expected, what came, and (where one exists) a hint.
Torch-free: the runtime imports this module.
"""

from __future__ import annotations


class AvgEdgeError(Exception):
    """Root of every error avg-edge raises deliberately."""


class ConfigError(AvgEdgeError, ValueError):
    """A config.json value is missing or invalid (also a ValueError)."""


class CheckpointError(AvgEdgeError):
    """A checkpoint folder is incomplete, or its weights do not match the model."""


class ImageError(AvgEdgeError, ValueError):
    """An image could not be read or is not usable."""


class InputError(AvgEdgeError, ValueError):
    """A call received an argument outside what it accepts."""


class UsageError(AvgEdgeError, ValueError):
    """A command-line argument is wrong (exit code 2)."""
