"""Output directories that appear whole or not at all: refused before any work, renamed when complete.

`check_output_dir` refuses a bad target before anything is read or written
(an existing one unless asked to overwrite, one whose parent is missing or
unwritable, one that is or holds an input); `AtomicDir` writes into a
temporary directory beside the target and renames it at the end, removing it
on failure, so no half-written output is ever left under the target's name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Sequence

from sdar_jax.checkpoint.errors import ConversionError


def _within(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def check_output_dir(
    target: str | os.PathLike, overwrite: bool = False, sources: Sequence[str | os.PathLike] = (),
) -> str:
    """Refuses an output directory before any work is done; returns its absolute path.

    Refused: an existing target (unless `overwrite`) or one that is not a
    directory, a missing or unwritable parent, and a target that is, or
    holds, one of the `sources` (overwriting it would delete the input).
    """
    target = os.path.abspath(os.fspath(target))
    real = os.path.realpath(target)
    for src in sources:
        src_real = os.path.realpath(os.fspath(src))
        if _within(src_real, real):
            raise ConversionError(
                f"{target}: the output would replace the input {os.fspath(src)} (choose another output directory)"
            )
    if os.path.lexists(target):
        if not overwrite:
            raise ConversionError(f"{target}: already exists (choose a new output directory)")
        if not os.path.isdir(target) or os.path.islink(target):
            raise ConversionError(f"{target}: exists and is not a directory (refusing to replace it)")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise ConversionError(f"{parent}: output's parent directory does not exist")
    try:  # the real test: whatever makes a directory fail (permissions, read-only mount)
        os.rmdir(tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.probe-", dir=parent))
    except OSError as e:
        raise ConversionError(f"{parent}: cannot create the output there ({e.strerror or e})") from e
    return target


class AtomicDir:
    """Context manager: a temporary directory next to `target`, renamed to
    `target` on success and removed on failure (no half-written outputs).

    `with AtomicDir(out) as tmp:` yields the temporary path to write into.
    The target is checked with `check_output_dir` (an existing one is refused
    unless `overwrite`, as is one that is or holds one of `sources`).
    """

    def __init__(self, target: str | os.PathLike, overwrite: bool = False,
                 sources: Sequence[str | os.PathLike] = ()):
        self.target = os.path.abspath(os.fspath(target))
        self.overwrite = overwrite
        self.sources = tuple(sources)
        self.path = ""

    def __enter__(self) -> str:
        check_output_dir(self.target, self.overwrite, self.sources)
        parent = os.path.dirname(self.target)
        try:
            self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.tmp-", dir=parent)
        except OSError as e:
            raise ConversionError(f"{parent}: cannot create the output there ({e.strerror or e})") from e
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        os.chmod(self.path, 0o755)
        if os.path.exists(self.target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.old-",
                                   dir=os.path.dirname(self.target))
            os.rename(self.target, os.path.join(old, "out"))
            os.rename(self.path, self.target)
            shutil.rmtree(old)
        else:
            os.rename(self.path, self.target)
