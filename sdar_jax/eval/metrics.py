"""Evaluation metrics: unbiased pass@k, majority voting, accuracy summaries.

All host-side (plain Python / NumPy): they run once per evaluation on a few
thousand numbers, after decoding.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

from sdar_jax.eval import answers


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from `n` samples of which `c` are correct.

    Chen et al. (2021), `1 - C(n-c, k) / C(n, k)`, computed in the numerically
    stable product form `1 - prod_{i=n-c+1}^{n} (1 - k / i)`; exactly 1.0 when
    `n - c < k` (every draw of k samples holds a correct one).
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def majority_vote(votes: Sequence[str | None],
                  key: Callable[[str], Hashable | None] | None = None) -> tuple[str | None, int]:
    """The most frequent vote and its count; `None` votes (no answer) are not counted.

    Votes are grouped by `key(vote)` (identity by default; a vote whose key is
    None is dropped too). Ties are broken by first appearance: among the
    groups with the most votes, the one whose earliest member comes first in
    `votes` wins, and its earliest member is returned. Returns (None, 0) when
    no vote counts.
    """
    counts: collections.Counter[Hashable] = collections.Counter()
    first: dict[Hashable, int] = {}
    for i, vote in enumerate(votes):
        if vote is None:
            continue
        group = vote if key is None else key(vote)
        if group is None:
            continue
        counts[group] += 1
        first.setdefault(group, i)
    if not counts:
        return None, 0
    best = min(counts, key=lambda g: (-counts[g], first[g]))
    return votes[first[best]], counts[best]


def majority_answer(prediction_texts: Sequence[str], style: str) -> tuple[str | None, int]:
    """Majority vote over the final answers of several samples of one problem.

    Answers are extracted with `answers.extract_answer` and grouped by
    `answers.answer_key` (so `0.5` and `\\frac12` vote together in math style).
    Returns the winning answer as the first sample that gave it wrote it, and its votes.
    """
    extracted = [answers.extract_answer(t, style) for t in prediction_texts]
    return majority_vote(extracted, key=lambda a: answers.answer_key(a, style))


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """`correct` of `total` examples; `stderr` the binomial standard error sqrt(p(1-p)/total)."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def stderr(self) -> float:
        p = self.accuracy
        return math.sqrt(p * (1.0 - p) / self.total)


def accuracy(correct: Sequence[bool]) -> Accuracy:
    """Accuracy of a non-empty sequence of per-example outcomes."""
    if len(correct) == 0:
        raise ValueError("accuracy of an empty sequence is undefined")
    return Accuracy(correct=int(sum(bool(c) for c in correct)), total=len(correct))


def accuracy_by_group(groups: Sequence[str], correct: Sequence[bool]) -> Mapping[str, Accuracy]:
    """Accuracy per group (e.g. task name), in first-appearance order, plus "all" over everything."""
    if len(groups) != len(correct):
        raise ValueError(f"groups and correct differ in length: {len(groups)} vs {len(correct)}")
    if "all" in groups:
        raise ValueError("'all' is reserved for the overall accuracy; rename that group")
    by_group: dict[str, list[bool]] = {}
    for group, ok in zip(groups, correct):
        by_group.setdefault(group, []).append(bool(ok))
    summary = {group: accuracy(oks) for group, oks in by_group.items()}
    summary["all"] = accuracy(correct)
    return summary
