"""An adaptation corpus that needs no download: a model's own chat answers plus the embedded tasks.

`instructions(n)` are generated chat instructions (template x topic); the
caller has the AR model answer them (`eval.runner.generate_texts`), and
`split_corpus` turns those answers and the tasks' splits (`data.tasks`) into
the three record lists (JSONL files) of an adaptation run:

  train      most answers + task train examples (prompt / response, trained as SFT)
  heldout    the other answers + task test examples (the held-out loss set)
  task_eval  task test prompts with their answers (decoded and scored), disjoint
             from the held-out loss examples

Task examples are taken round-robin over the tasks (`balanced_by_task`), so a
short prefix still covers every task.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

TEMPLATES = (
    "Write a short paragraph about {}.",
    "Explain {} to a ten-year-old in a few sentences.",
    "Give three facts about {}.",
    "What is the most important thing to know about {}?",
)
TOPICS = (
    "the moon", "volcanoes", "honey bees", "the water cycle", "photosynthesis", "the Roman Empire",
    "electricity", "rainbows", "the human heart", "recycling", "the Pacific Ocean", "dinosaurs",
    "gravity", "coffee", "the internet", "sleep", "chess", "bicycles", "clouds", "the piano",
    "penguins", "earthquakes", "vaccines", "the Sahara desert", "compound interest", "tea",
    "the printing press", "magnets", "rain forests", "the Olympic Games", "bread baking",
    "black holes", "the alphabet", "trains", "mushrooms", "the French Revolution", "glaciers",
    "solar panels", "friendship", "maps",
)
SPLITS = ("train", "heldout", "task_eval")


def instructions(n: int) -> list[str]:
    """The first n of template x topic, templates varying fastest (every template early)."""
    order = [t.format(topic) for topic in TOPICS for t in TEMPLATES]
    if not 1 <= n <= len(order):
        raise ValueError(f"instructions: n={n}; expected 1..{len(order)} (templates x topics)")
    return order[:n]


def balanced_by_task(records: Sequence[Mapping[str, Any]], n: int) -> list[dict[str, Any]]:
    """n records taking the tasks in turn, each task's records in file order."""
    if n > len(records):
        raise ValueError(f"balanced_by_task: asked for {n} examples; there are {len(records)}")
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    out: list[dict[str, Any]] = []
    i = 0
    while len(out) < n:
        for group in by_task.values():
            if i < len(group) and len(out) < n:
                out.append(dict(group[i]))
        i += 1
    return out


def _sft(records: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    return [{"prompt": r["prompt"], "response": r["response"]} for r in records]


def split_corpus(answers: Sequence[Mapping[str, str]], task_train: Sequence[Mapping[str, Any]],
                 task_test: Sequence[Mapping[str, Any]], *,
                 heldout_fraction: float, n_task_train: int, n_task_loss: int,
                 n_task_eval: int) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """The records of each split and their counts.

    Args:
      answers: the model's answers, dicts with `prompt` and `response`; empty
        responses are dropped. The last `heldout_fraction` (at least one) are held out.
      task_train, task_test: the tasks' splits (`data.tasks.load_split`).
      heldout_fraction: share of the answers held out, in (0, 1).
      n_task_train: task train examples in `train`.
      n_task_loss: task test examples in `heldout`, taken from the end of each task.
      n_task_eval: task test examples in `task_eval`, from the start of each task.

    Returns:
      ({split: records} for every split in SPLITS, {count name: count}).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"split_corpus: heldout_fraction {heldout_fraction}; expected (0, 1)")
    kept = [a for a in answers if a["response"]]
    n_held = max(1, round(len(kept) * heldout_fraction))
    if n_held >= len(kept):
        raise ValueError(f"split_corpus: {len(kept)} non-empty answers leave none to train on "
                         f"after holding out {n_held}")
    by_task_reversed = [r for t in dict.fromkeys(r["task"] for r in task_test)
                        for r in reversed([x for x in task_test if x["task"] == t])]
    task_eval = balanced_by_task(task_test, n_task_eval)
    task_loss = balanced_by_task(by_task_reversed, n_task_loss)
    overlap = {r["prompt"] for r in task_eval} & {r["prompt"] for r in task_loss}
    if overlap:
        raise ValueError(f"split_corpus: n_task_eval {n_task_eval} + n_task_loss {n_task_loss} "
                         f"overlap on {len(overlap)} test prompts; use fewer")
    splits = {
        "train": _sft(kept[:-n_held]) + _sft(balanced_by_task(task_train, n_task_train)),
        "heldout": _sft(kept[-n_held:]) + _sft(task_loss),
        "task_eval": task_eval,
    }
    counts = dict(answers_train=len(kept) - n_held, answers_heldout=n_held,
                  answers_empty=len(answers) - len(kept), task_train=n_task_train,
                  task_heldout_loss=n_task_loss, task_eval=n_task_eval)
    return splits, counts
