"""The error of reading, writing or converting a params checkpoint, and a caught error in one line."""

from __future__ import annotations


class ConversionError(ValueError):
    """The input checkpoint does not match what the config describes, or is unreadable."""


def first_line(error: BaseException) -> str:
    """`TypeName: first line of the message`, for one-line reports of a caught error."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
