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
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import grain.checkpoint
import jax
import orbax.checkpoint as ocp

STATE, DATA, CONFIG = "state", "data", "config"


class Checkpointer:
    """An orbax CheckpointManager for train state + data iterator + config.

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
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

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
        return self._manager.save(
            step,
            args=ocp.args.Composite(**{
                STATE: ocp.args.StandardSave(state),
                DATA: grain.checkpoint.CheckpointSave(data_iterator),
                CONFIG: ocp.args.JsonSave(dict(config)),
            }),
            force=force,
        )

    def restore(self, abstract_state: Any, data_iterator: Any, step: int | None = None) -> tuple[Any, int]:
        """Restores the state and sets the iterator's position.

        Args:
          abstract_state: a TrainState of ShapeDtypeStructs, each with the
            sharding to restore onto.
          data_iterator: the (fresh) grain iterator to position; set in place.
          step: the step to restore; None for the latest.

        Returns:
          (state, step).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(abstract_state),
                DATA: grain.checkpoint.CheckpointRestore(data_iterator),
            }),
        )
        return restored[STATE], step

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        """The run config saved with a step (the latest by default)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
        return restored[CONFIG]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.wait_until_finished()
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
