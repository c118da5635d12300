"""Training metrics: a console progress bar (tqdm) and TensorBoard event files (tensorboardX).

Only process 0 writes; other processes get a writer that does nothing, so the
loop calls the same methods everywhere.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Mapping

import tqdm


class Throughput:
    """Tokens per second between consecutive `update` calls (wall clock)."""

    def __init__(self) -> None:
        self._last: float | None = None

    def reset(self) -> None:
        """Forget the previous time (after a pause such as eval or a save)."""
        self._last = None

    def update(self, num_tokens: float) -> float | None:
        """Records a finished step of `num_tokens` tokens; returns tokens/s, or
        None for the first step after a reset (it includes compilation)."""
        now = time.perf_counter()
        rate = None if self._last is None else num_tokens / max(now - self._last, 1e-9)
        self._last = now
        return rate


class MetricsWriter:
    """Writes scalars to `<logdir>` (TensorBoard) and shows progress on the console.

    Args:
      logdir: the event-file directory.
      total_steps: the run's last step (progress bar total).
      initial_step: the step the run starts (or resumes) from.
      enabled: False on every process but 0.
      progress_bar: show a tqdm bar (stderr).
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        *,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        progress_bar: bool = True,
    ):
        self._enabled = enabled
        self._logdir = os.fspath(logdir)
        self._files = 0
        self._writer = None
        if enabled:
            self._open()
        self._bar = (
            tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)
            if enabled and progress_bar else None
        )

    def _open(self) -> None:
        # Imported here, not at the top: tensorboardX imports torch whenever it is installed
        # (seconds), which a run that stops at bad input before training should not pay.
        import tensorboardX

        suffix = f".{self._files}" if self._files else ""
        self._writer = tensorboardX.SummaryWriter(self._logdir, filename_suffix=suffix)
        self._files += 1

    def write_scalars(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
        """Logs `prefix/name` scalars at `step`."""
        if not self._enabled:
            return
        if self._writer is None:
            self._open()
        for name, value in scalars.items():
            self._writer.add_scalar(f"{prefix}/{name}", float(value), global_step=step)

    def set_postfix(self, scalars: Mapping[str, float]) -> None:
        """Shows the latest values next to the progress bar."""
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def write_text(self, message: str) -> None:
        """A line on stderr (with the progress bar) that does not break the bar."""
        if self._enabled:
            tqdm.tqdm.write(message, file=sys.stderr)

    def flush(self) -> None:
        """Puts every scalar written so far on disk. tensorboardX's own flush leaves the events
        still queued for its writer thread unwritten; closing the writer drains the queue, so
        the writer is closed and the next scalars go to a new event file of the same directory."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
