"""A procedural training stream of the embedded tasks: fresh problems, never a test prompt.

`ProceduralTaskSource` is a grain random-access source whose record `i` is a
task problem generated from `np.random.default_rng([seed, task_index, i])`
(task `tasks[i % len(tasks)]`, so the tasks alternate evenly). A record
whose prompt is in the excluded set (by default every prompt of the shipped
test split, all tasks) is redrawn from the same generator until it is not,
so the stream never yields a test prompt. Record `i` depends only on
`(seed, task, i)`: the stream is deterministic, and since grain iterators
over a random-access source checkpoint as an index, it resumes exactly
through the pipeline's `get_state()` / `set_state()`.

The source is `NUM_RECORDS` (2**31 - 1) records long, far more than any run
reads, so in practice no problem repeats within a run except by chance
(the tasks' prompt spaces are finite: ~810k add, ~8k word prompts).

Runs name it as a data path (`data.train_path`):

    procedural:add,sort,word            seed 0
    procedural:add,sort,word@seed=3     another stream
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from sdar_jax.data import tasks as tasks_lib

PREFIX = "procedural:"
NUM_RECORDS = 2**31 - 1
# Redraws of one record before giving up (the excluded set is tiny next to
# every task's prompt space, so a record needs more than a few only by a bug).
MAX_REDRAWS = 1000


class ProceduralSpecError(ValueError):
    """A `procedural:` data path is malformed."""


def is_spec(spec: Any) -> bool:
    """Whether a data path names the procedural stream."""
    return isinstance(spec, str) and spec.strip().startswith(PREFIX)


def test_prompts(directory: str = tasks_lib.TASK_DIR) -> frozenset[str]:
    """Every prompt of `directory`'s test split (all tasks)."""
    return frozenset(e["prompt"] for e in tasks_lib.load_split("test", directory))


class ProceduralTaskSource:
    """Endless, seeded task problems as `{"task", "prompt", "response", "answer"}` records.

    Args:
      tasks: task names (a subset of `tasks.TASKS`), cycled record by record.
      seed: the stream's seed.
      exclude: prompts never to yield; None = the shipped test split's prompts.
    """

    def __init__(self, tasks: Sequence[str], seed: int = 0,
                 exclude: Iterable[str] | None = None):
        tasks = tuple(tasks)
        unknown = [t for t in tasks if t not in tasks_lib.GENERATORS]
        if not tasks or unknown:
            raise ProceduralSpecError(
                f"procedural source: tasks {list(tasks)} must be a non-empty subset of "
                f"{list(tasks_lib.TASKS)}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ProceduralSpecError(f"procedural source: seed must be an int >= 0, got {seed!r}")
        self.tasks = tasks
        self.seed = int(seed)
        self.exclude = test_prompts() if exclude is None else frozenset(exclude)

    @classmethod
    def from_spec(cls, spec: str) -> "ProceduralTaskSource":
        """From `procedural:TASK[,TASK...][@seed=S]` (see the module docstring)."""
        body = spec.strip()[len(PREFIX):]
        names, _, option = body.partition("@")
        seed = 0
        if option:
            key, _, value = option.partition("=")
            if key.strip() != "seed" or not value.strip().isdigit():
                raise ProceduralSpecError(
                    f"data path {spec!r}: expected `procedural:TASKS@seed=N`, got option {option!r}")
            seed = int(value)
        task_names = tuple(t.strip() for t in names.split(",") if t.strip())
        try:
            return cls(task_names, seed)
        except ProceduralSpecError as e:
            raise ProceduralSpecError(f"data path {spec!r}: {e}") from e

    def __len__(self) -> int:
        return NUM_RECORDS

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < NUM_RECORDS:
            raise IndexError(f"procedural record index {index} out of range [0, {NUM_RECORDS})")
        task = self.tasks[index % len(self.tasks)]
        rng = np.random.default_rng([self.seed, tasks_lib.TASKS.index(task), index])
        make = tasks_lib.GENERATORS[task]
        for _ in range(MAX_REDRAWS):
            example = make(rng)
            if example["prompt"] not in self.exclude:
                return {**example, "_origin": f"procedural:{task}@seed={self.seed}#{index}"}
        raise RuntimeError(f"procedural source: {MAX_REDRAWS} draws of record {index} ({task}) "
                           "all hit excluded prompts")

    def __repr__(self) -> str:
        return f"ProceduralTaskSource(tasks={list(self.tasks)}, seed={self.seed})"


def spec_for(task_names: Sequence[str], seed: int = 0) -> str:
    """The data path of the stream of `task_names` with `seed`."""
    return f"{PREFIX}{','.join(task_names)}" + (f"@seed={seed}" if seed else "")
