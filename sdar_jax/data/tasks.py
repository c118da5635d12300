"""An embedded suite of small verifiable tasks, generated from a seed (no download).

Four tasks, each short enough for a tiny char-level model to learn on a CPU:

- `add`:  column-wise addition of two 2-3 digit numbers, one line per column
          (`7+8=15`, then `5+6+1=12` with the carry), right to left.
- `mul`:  a 2-digit number times a 1-2 digit number, with the partial products
          and their sum.
- `sort`: sort 4-7 digits, or 3-5 words, ascending.
- `word`: a two-step word problem (gain then loss, or groups then loss).

Every example is `{"task", "prompt", "response", "answer"}`; the response ends
with a GSM8K-style final line `#### <answer>`, so `sdar_jax.eval.answers`
grades it with style "gsm8k". The test split is drawn first, then the train
split from the remaining prompts, so no prompt is in both.

The shipped files `assets/tasks/{train,test}.jsonl` were written by

    python -m sdar_jax.data.tasks --out sdar_jax/data/assets/tasks \
        --seed 0 --n-train 2000 --n-test 100
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

Example = dict[str, str]

TASKS = ("add", "mul", "sort", "word")
TASK_DIR = os.path.join(os.path.dirname(__file__), "assets", "tasks")
DEFAULT_SEED = 0
DEFAULT_N_TRAIN = 2000
DEFAULT_N_TEST = 100
FIELDS = ("task", "prompt", "response", "answer")

_WORDS = ("ant", "bee", "cat", "cow", "dog", "elk", "emu", "fox", "gnu", "hen",
          "owl", "pig", "ram", "rat", "yak", "ape", "bat", "eel", "jay", "koi")
_NAMES = ("ann", "bob", "kim", "dan", "eve", "max", "sam", "tom", "zoe", "liz")
_OBJECTS = ("apples", "plums", "nuts", "figs", "eggs", "pears", "limes", "dates")


def _example(task: str, prompt: str, steps: Sequence[str], answer: str) -> Example:
    response = "\n".join([*steps, f"#### {answer}"])
    return {"task": task, "prompt": prompt, "response": response, "answer": answer}


def addition_steps(a: int, b: int) -> list[str]:
    """Column-wise addition, right to left: `da+db[+1]=s` per column, `+1` for a carry."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        terms = [int(s[i]) for s in (da, db) if i < len(s)] + [1] * carry
        total = sum(terms)
        steps.append("+".join(map(str, terms)) + f"={total}")
        carry = total // 10
    return steps


def make_add(rng: np.random.Generator) -> Example:
    a, b = (int(rng.integers(10, 1000)) for _ in range(2))
    return _example("add", f"{a}+{b}=?", addition_steps(a, b), str(a + b))


def multiplication_steps(a: int, b: int) -> list[str]:
    """Partial products of `a` with each digit of `b` (times its place), then their sum."""
    partials = []
    steps = []
    for place, digit in enumerate(reversed(str(b))):
        factor = int(digit) * 10**place
        partials.append(a * factor)
        steps.append(f"{a}*{factor}={a * factor}")
    if len(partials) > 1:
        steps.append("+".join(map(str, partials)) + f"={sum(partials)}")
    return steps


def make_mul(rng: np.random.Generator) -> Example:
    a = int(rng.integers(10, 100))
    b = int(rng.integers(2, 100))
    return _example("mul", f"{a}*{b}=?", multiplication_steps(a, b), str(a * b))


def make_sort(rng: np.random.Generator) -> Example:
    if rng.random() < 0.5:
        items = [str(d) for d in rng.integers(0, 10, size=int(rng.integers(4, 8)))]
    else:
        picks = rng.choice(len(_WORDS), size=int(rng.integers(3, 6)), replace=False)
        items = [_WORDS[i] for i in picks]
    answer = " ".join(sorted(items))
    return _example("sort", "sort: " + " ".join(items), [], answer)


def make_word(rng: np.random.Generator) -> Example:
    name = _NAMES[int(rng.integers(len(_NAMES)))]
    obj = _OBJECTS[int(rng.integers(len(_OBJECTS)))]
    if rng.random() < 0.5:
        a, b = int(rng.integers(2, 40)), int(rng.integers(2, 40))
        c = int(rng.integers(1, a + b + 1))
        prompt = f"{name} has {a} {obj}, gets {b} more, eats {c}. how many?"
        steps = [f"{a}+{b}={a + b}", f"{a + b}-{c}={a + b - c}"]
        answer = a + b - c
    else:
        a, b = int(rng.integers(2, 10)), int(rng.integers(2, 10))
        c = int(rng.integers(1, a * b + 1))
        prompt = f"{name} has {a} bags of {b} {obj}, eats {c}. how many?"
        steps = [f"{a}*{b}={a * b}", f"{a * b}-{c}={a * b - c}"]
        answer = a * b - c
    return _example("word", prompt, steps, str(answer))


GENERATORS: Mapping[str, Callable[[np.random.Generator], Example]] = {
    "add": make_add, "mul": make_mul, "sort": make_sort, "word": make_word,
}


def _draw_unique(make: Callable[[np.random.Generator], Example], rng: np.random.Generator,
                 n: int, exclude: set[str], task: str, max_misses: int = 1000) -> list[Example]:
    """`n` examples whose prompts are distinct and not in `exclude` (which grows).

    Gives up after `max_misses` repeated prompts in a row (the task's prompt
    space is then nearly exhausted).
    """
    out: list[Example] = []
    misses = 0
    while len(out) < n:
        ex = make(rng)
        if ex["prompt"] in exclude:
            misses += 1
            if misses >= max_misses:
                raise ValueError(f"task {task!r}: could not draw {n} distinct prompts "
                                 f"(got {len(out)}); ask for fewer examples")
            continue
        misses = 0
        exclude.add(ex["prompt"])
        out.append(ex)
    return out


def generate_splits(seed: int, n_train: int, n_test: int,
                    tasks: Sequence[str] = TASKS) -> tuple[list[Example], list[Example]]:
    """Train and test examples for each task (test drawn first; prompts never repeat).

    Each task draws from its own stream `np.random.default_rng([seed, index])`,
    `index` its position in `TASKS`, so adding a task leaves the others unchanged.
    Returns (train, test), each grouped by task in the order of `tasks`.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    unknown = [t for t in tasks if t not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; expected some of {list(TASKS)}")
    train, test = [], []
    for task in tasks:
        rng = np.random.default_rng([seed, TASKS.index(task)])
        seen: set[str] = set()
        test += _draw_unique(GENERATORS[task], rng, n_test, seen, task)
        train += _draw_unique(GENERATORS[task], rng, n_train, seen, task)
    return train, test


def write_jsonl(path: str, examples: Iterable[Mapping[str, str]]) -> None:
    """One JSON object per line, keys in `FIELDS` order, UTF-8, '\\n' line ends."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for ex in examples:
            f.write(json.dumps({k: ex[k] for k in FIELDS}, ensure_ascii=False) + "\n")


def read_jsonl(path: str) -> list[Example]:
    """Reads examples written by `write_jsonl`; every line must carry all of `FIELDS`."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            ex = json.loads(line)
            missing = [k for k in FIELDS if k not in ex]
            if missing:
                raise ValueError(f"{path}:{lineno}: example lacks fields {missing}; "
                                 f"expected {list(FIELDS)}")
            examples.append(ex)
    return examples


def load_split(split: str, directory: str = TASK_DIR,
               tasks: Sequence[str] | None = None) -> list[Example]:
    """The shipped (or a regenerated) `split` ("train" or "test"), optionally filtered by task."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = os.path.join(directory, f"{split}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; write it with "
                                f"`python -m sdar_jax.data.tasks --out {directory}`")
    examples = read_jsonl(path)
    return examples if tasks is None else [e for e in examples if e["task"] in tasks]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for train.jsonl and test.jsonl")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN, help="per task")
    parser.add_argument("--n-test", type=int, default=DEFAULT_N_TEST, help="per task")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    args = parser.parse_args(argv)
    train, test = generate_splits(args.seed, args.n_train, args.n_test, args.tasks)
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "test.jsonl"), test)


if __name__ == "__main__":
    main()
