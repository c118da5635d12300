"""pass@k against its closed form with exact integers; majority voting; accuracy."""

import fractions
import math

import numpy as np
import pytest

from sdar_jax.eval import metrics


def _closed_form(n: int, c: int, k: int) -> fractions.Fraction:
    return 1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_exact_closed_form_on_a_grid():
    for n in (1, 2, 3, 5, 10, 16, 50, 200):
        for c in range(n + 1):
            for k in range(1, n + 1):
                got = metrics.pass_at_k(n, c, k)
                want = float(_closed_form(n, c, k))
                assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (n, c, k)


def test_pass_at_k_edge_cases():
    assert metrics.pass_at_k(10, 0, 1) == 0.0
    assert metrics.pass_at_k(10, 0, 10) == 0.0
    assert metrics.pass_at_k(10, 10, 1) == 1.0
    assert metrics.pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k: every 3-subset has a correct one
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3, rel=1e-15)  # pass@1 = c / n
    # Large n, where the ratio of binomials under/overflows as floats.
    n, c, k = 2000, 7, 100
    assert metrics.pass_at_k(n, c, k) == pytest.approx(float(_closed_form(n, c, k)), rel=1e-12)


@pytest.mark.parametrize("args, match", [
    ((0, 0, 1), "n >= 1"),
    ((5, 6, 1), "c <= n"),
    ((5, -1, 1), "c <= n"),
    ((5, 2, 0), "k must be"),
    ((5, 2, 6), "k must be"),
])
def test_pass_at_k_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        metrics.pass_at_k(*args)
    with pytest.raises(TypeError, match="k must be an int"):
        metrics.pass_at_k(5, 2, 1.0)


def test_majority_vote_counts_and_ties():
    assert metrics.majority_vote(["3", "4", "4", None, "3", "4"]) == ("4", 3)
    # Tie between "7" (first at index 1) and "5" (first at index 2): "7" wins.
    assert metrics.majority_vote([None, "7", "5", "5", "7"]) == ("7", 2)
    assert metrics.majority_vote(["b", "a"]) == ("b", 1)
    assert metrics.majority_vote([None, None]) == (None, 0)
    assert metrics.majority_vote([]) == (None, 0)
    # Grouping by a key: case-insensitive votes; the earliest member represents the group.
    assert metrics.majority_vote(["Yes", "no", "YES", "No", "yes"], key=str.lower) == ("Yes", 3)


def test_majority_answer_groups_equivalent_answers():
    samples = [
        "so \\boxed{\\frac12}",
        "thus \\boxed{3}",
        "we get \\boxed{0.5}",
        "finally \\boxed{3}",
        "answer: \\boxed{\\dfrac{1}{2}}",
        "no box here",
    ]
    assert metrics.majority_answer(samples, "math") == ("\\frac12", 3)
    gsm = ["#### 12", "#### 12.0", "#### 1,000", "#### $1000.", "#### 1000", "nothing"]
    assert metrics.majority_answer(gsm, "gsm8k") == ("1000", 3)


def test_accuracy_and_groups():
    acc = metrics.accuracy([True, False, True, True])
    assert (acc.correct, acc.total, acc.accuracy) == (3, 4, 0.75)
    assert acc.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    summary = metrics.accuracy_by_group(["add", "mul", "add", "sort"], [True, False, False, True])
    assert list(summary) == ["add", "mul", "sort", "all"]
    assert summary["add"] == metrics.Accuracy(1, 2)
    assert summary["mul"].accuracy == 0.0
    assert summary["all"] == metrics.Accuracy(2, 4)
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy([])
    with pytest.raises(ValueError, match="2 vs 1"):
        metrics.accuracy_by_group(["a", "b"], [True])
    with pytest.raises(ValueError, match="'all' is reserved"):
        metrics.accuracy_by_group(["all"], [True])
