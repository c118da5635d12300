"""Freed heap memory handed back to the OS while a conversion streams pieces (glibc malloc_trim)."""

from __future__ import annotations

import ctypes
import functools
from typing import Callable

# Bytes converted between two returns of freed heap memory to the OS (FreedMemory).
_TRIM_BYTES = 16 * 1024**2


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


class FreedMemory:
    """Hands freed heap memory back to the OS every _TRIM_BYTES converted.

    tensorstore copies each piece on its own threads, and glibc keeps what
    those threads free in per-thread arenas: without trimming, the process's
    resident size creeps up with the number of pieces (measured: +130 MB
    over 27 small layers) although nothing is live.
    """

    def __init__(self) -> None:
        self._since = 0

    def add(self, nbytes: int) -> None:
        self._since += nbytes
        trim = _malloc_trim()
        if self._since >= _TRIM_BYTES and trim is not None:
            trim(0)
            self._since = 0
