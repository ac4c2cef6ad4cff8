"""Exceptions raised by the core.  Each message says what was wrong and what is expected."""

from __future__ import annotations


class RealSRError(Exception):
    """Base class of every error the core raises on purpose."""


class CheckpointError(RealSRError):
    """A file could not be read as a checkpoint (missing, truncated, unsafe, wrong container)."""


class UnsupportedModelError(RealSRError):
    """A state dict matched no architecture the pack knows."""


class InvalidInputError(RealSRError, ValueError):
    """An image or an option is outside what the model accepts (size, NaN, range, channels)."""


class Cancelled(RealSRError):
    """Raised when a cancellation check asked the running job to stop."""


class NumericalError(RealSRError):
    """A model produced NaN or infinite values: the result is refused rather than saved as black pixels."""


class RealSRWarning(UserWarning):
    """Something was adjusted or ignored (a tile raised to the minimum, an option the model does not take)."""
