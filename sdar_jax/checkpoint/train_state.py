"""Training checkpoints with orbax: train state, data-iterator state and run config.

One step directory (`<workdir>/checkpoints/<step>/`) holds three items of an
`ocp.args.Composite`:

- `state`: the TrainState pytree (params, optimizer state, step, PRNG key),
  saved with `StandardSave` (sharded, tensorstore); restored onto the target
  shardings carried by an abstract state (resharding on restore).
- `data`: the grain iterator state, one JSON file per process
  (`grain.checkpoint.CheckpointHandler`), so every host resumes its own shard.
- `config`: the run config as JSON, for a person to read and for provenance.

Saves are asynchronous (the device-to-host copy happens before `save`
returns, so the caller may donate the state right after), the last `keep`
steps are kept, and a step directory appears under its final name only once
every item is written (orbax's temporary-directory + rename), so a crash
mid-save never leaves a half checkpoint that `latest_step` would pick.

Integrity (`sdar_jax.checkpoint.integrity`): every step also records
`sdar_integrity.json`, the size and SHA-256 of each of its files. It is
written into orbax's staging directory after every item is finalised and
before the directory is renamed to its final name (asynchronous saves; a
synchronous save seals the final directory right after), so a step without it
is an interrupted save. `restore` walks the steps newest first and takes the
first one whose files match their record, whose items restore and whose
state is finite everywhere; each step it passes over gets one warning naming
the step and the file, and is renamed `<step>.damaged` so that the resumed
run can save that step again. When no step is intact it raises
`CheckpointIntegrityError` listing what it found for each.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
from typing import Any, Callable, Mapping, NamedTuple

import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sdar_jax.checkpoint.errors import first_line
from sdar_jax.checkpoint.integrity import (
    INTEGRITY_FILE,
    CheckpointIntegrityError,
    DamagedStep,
    first_non_finite,
    verify_step_files,
    write_integrity_record,
)

STATE, DATA, CONFIG = "state", "data", "config"
DAMAGED_SUFFIX = ".damaged"
# orbax stages a step in `<step>.orbax-checkpoint-tmp...` and renames it when done.
_STAGING_SUFFIX = ".orbax-checkpoint-tmp"

_log = logging.getLogger(__name__)


class Restored(NamedTuple):
    """What `Checkpointer.restore` returns: the state, its step, the steps passed over."""

    state: Any
    step: int
    damaged: tuple[DamagedStep, ...] = ()


class Checkpointer:
    """An orbax CheckpointManager for train state + data iterator + config, with
    integrity records (see the module docstring).

    Args:
      directory: where step directories go (created if missing).
      save_every: save when `step % save_every == 0` (see `should_save`).
      keep: number of most recent checkpoints to keep.
      async_save: write in a background thread.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"Checkpointer: save_every ({save_every}) and keep ({keep}) must be >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self._unsealed: set[int] = set()  # started saves whose integrity record is not written yet
        self._lock = threading.Lock()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_staged) if async_save else None,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _seal_staged(self) -> None:
        """orbax's post-finalisation hook (background thread): every item of the step in
        flight is written, its staging directory not yet renamed. orbax runs one save
        at a time, so the started steps with a staging directory are that one (or
        leftovers of failed saves, which never become steps)."""
        if jax.process_index() != 0:
            return
        with self._lock:
            steps = sorted(self._unsealed)
        for step in steps:
            staged = glob.glob(glob.escape(self._step_dir(step)) + _STAGING_SUFFIX + "*")
            if len(staged) == 1 and os.path.isdir(staged[0]):
                try:
                    write_integrity_record(staged[0], step)
                except OSError as e:  # the step then reads as interrupted; training goes on
                    _log.warning("checkpoint step %d: could not write %s: %s", step, INTEGRITY_FILE, e)
                with self._lock:
                    self._unsealed.discard(step)

    def _seal_final(self) -> None:
        """Seals finished steps still without a record (synchronous saves; storage
        without staging directories). Records are read and written with POSIX file
        calls: checkpoint directories are local or mounted file systems."""
        with self._lock:
            steps = sorted(self._unsealed)
        for step in steps:
            final = self._step_dir(step)
            if os.path.isdir(final):
                if jax.process_index() == 0 and not os.path.exists(os.path.join(final, INTEGRITY_FILE)):
                    write_integrity_record(final, step)
                with self._lock:
                    self._unsealed.discard(step)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True when `step` is a multiple of save_every (orbax would also save the
        first step of every process lifetime; a resumed run should not)."""
        return step % self.save_every == 0

    def reached_preemption(self, step: int) -> bool:
        """True (on every host at once) when the job is being preempted (multi-host runs)."""
        return self._manager.reached_preemption(step)

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any,
        config: Mapping[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Starts saving step `step`; returns whether a save was started.

        Args:
          step: the step number (the number of updates in `state`).
          state: the TrainState (arrays).
          data_iterator: a grain DatasetIterator / DataLoaderIterator positioned
            after the last consumed batch.
          config: the run config as a JSON-serialisable dict.
          force: save even off the interval.
        """
        with self._lock:
            self._unsealed.add(step)
        started = self._manager.save(
            step,
            args=ocp.args.Composite(**{
                STATE: ocp.args.StandardSave(state),
                DATA: grain.checkpoint.CheckpointSave(data_iterator),
                CONFIG: ocp.args.JsonSave(dict(config)),
            }),
            force=force,
        )
        if not started:
            with self._lock:
                self._unsealed.discard(step)
        # orbax finished the previous save before starting this one (a synchronous
        # save: this one too); seal whatever the staging hook could not.
        self._seal_final()
        return started

    def restore(
        self,
        abstract_state: Any,
        data_iterator: Any,
        step: int | None = None,
        *,
        check_config: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> Restored:
        """Restores the newest intact step's state and sets the iterator's position.

        A step is intact when its files match its integrity record, its items
        restore and every floating-point leaf of the state is finite. Steps
        newer than the one restored that are not intact are reported (one
        warning each, naming the file) and renamed `<step>.damaged`.

        Args:
          abstract_state: a TrainState of ShapeDtypeStructs, each with the
            sharding to restore onto.
          data_iterator: the (fresh) grain iterator to position; set in place.
          step: restore exactly this step (no fallback); None for the newest intact one.
          check_config: called with (step, its saved run config) before the
            step's state is restored; raise to refuse the resume (the error propagates).

        Returns:
          Restored(state, step, damaged).

        Raises:
          FileNotFoundError: there is no checkpoint at all.
          CheckpointIntegrityError: no candidate step is intact.
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        damaged: list[DamagedStep] = []
        for candidate in steps:
            problem = verify_step_files(self._step_dir(candidate))
            if problem is None:
                if check_config is not None:
                    check_config(candidate, self.restore_config(candidate))
                try:
                    restored = self._manager.restore(
                        candidate,
                        args=ocp.args.Composite(**{
                            STATE: ocp.args.StandardRestore(abstract_state),
                            DATA: grain.checkpoint.CheckpointRestore(data_iterator),
                        }),
                    )
                except Exception as e:  # noqa: BLE001 - any failure to read makes the step unusable
                    problem = f"restoring it failed ({first_line(e)})"
                else:
                    leaf = first_non_finite(restored[STATE])
                    if leaf is None:
                        self._set_aside(damaged)
                        return Restored(restored[STATE], candidate, tuple(damaged))
                    problem = f"state{leaf} holds NaN or inf"
            _log.warning("checkpoint step %d in %s is damaged: %s", candidate, self.directory, problem)
            damaged.append(DamagedStep(candidate, problem))
        raise CheckpointIntegrityError(self.directory, damaged)

    def _set_aside(self, damaged: list[DamagedStep]) -> None:
        """Renames damaged steps `<step>.damaged[.N]` (kept for inspection; orbax no
        longer lists them, so the resumed run can write those steps again)."""
        if not damaged:
            return
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("sdar_jax.checkpoint.verified")
        if jax.process_index() == 0:
            for entry in damaged:
                source = self._step_dir(entry.step)
                target, n = source + DAMAGED_SUFFIX, 1
                while os.path.exists(target):
                    target, n = f"{source}{DAMAGED_SUFFIX}.{n}", n + 1
                os.rename(source, target)
                _log.warning("checkpoint step %d moved to %s", entry.step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("sdar_jax.checkpoint.set_aside")
        self._manager.reload()

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        """The run config saved with a step (the latest by default)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
        return restored[CONFIG]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are finished (and sealed)."""
        self._manager.wait_until_finished()
        self._seal_final()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def with_shardings(abstract: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs carrying a sharding each: `shardings` (a matching
    pytree), or the first local device when None."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
