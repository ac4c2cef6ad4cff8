"""Progress and cancel callbacks, declared once for every long-running loop of the core.

``progress(done, total)`` is called after each unit of work (a tile batch, a sampling step); ``cancel()`` is
polled before each one, and returning True makes the loop raise :class:`~realsr_core.errors.Cancelled`.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["CancelFn", "ProgressFn"]

#: ``progress(done, total)`` after each unit of work.
ProgressFn = Callable[[int, int], None]
#: ``cancel() -> True`` to stop before the next unit of work.
CancelFn = Callable[[], bool]
