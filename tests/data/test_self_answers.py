"""The self-answer corpus: instruction order, task balance, and splits that do not overlap."""

from __future__ import annotations

import pytest

from sdar_jax.data import self_answers, tasks


def test_instructions_take_every_template_first():
    n = len(self_answers.TEMPLATES)
    first = self_answers.instructions(n)
    topic = self_answers.TOPICS[0]
    assert first == [t.format(topic) for t in self_answers.TEMPLATES]
    every = self_answers.instructions(n * len(self_answers.TOPICS))
    assert len(set(every)) == len(every)
    with pytest.raises(ValueError, match="expected 1..160"):
        self_answers.instructions(161)


def test_balanced_by_task_takes_the_tasks_in_turn():
    records = [{"task": t, "i": i} for t in ("a", "b", "c") for i in range(3)]
    got = self_answers.balanced_by_task(records, 5)
    assert [(r["task"], r["i"]) for r in got] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1)]
    uneven = [{"task": "a", "i": 0}] + [{"task": "b", "i": i} for i in range(3)]
    assert [(r["task"], r["i"]) for r in self_answers.balanced_by_task(uneven, 4)] == [
        ("a", 0), ("b", 0), ("b", 1), ("b", 2)]
    with pytest.raises(ValueError, match="asked for 10"):
        self_answers.balanced_by_task(records, 10)


def test_split_corpus_keeps_the_splits_apart():
    answers = [{"prompt": f"q{i}", "response": f"a{i}" if i != 3 else ""} for i in range(9)]
    train, test = tasks.load_split("train"), tasks.load_split("test")
    splits, counts = self_answers.split_corpus(answers, train, test, heldout_fraction=0.25,
                                               n_task_train=8, n_task_loss=8, n_task_eval=12)
    assert counts == dict(answers_train=6, answers_heldout=2, answers_empty=1, task_train=8,
                          task_heldout_loss=8, task_eval=12)
    assert [r["prompt"] for r in splits["heldout"][:2]] == ["q7", "q8"]  # the last answers
    assert all(set(r) == {"prompt", "response"} for s in ("train", "heldout") for r in splits[s])
    assert len(splits["train"]) == 6 + 8 and len(splits["heldout"]) == 2 + 8
    eval_prompts = {r["prompt"] for r in splits["task_eval"]}
    assert not eval_prompts & {r["prompt"] for r in splits["heldout"]}
    assert not eval_prompts & {r["prompt"] for r in splits["train"]}
    assert {r["task"] for r in splits["task_eval"]} == set(tasks.TASKS)
    assert all(r["answer"] for r in splits["task_eval"])  # scored against the reference
    with pytest.raises(ValueError, match="overlap"):
        self_answers.split_corpus(answers, train, test, heldout_fraction=0.25, n_task_train=1,
                                  n_task_loss=len(test), n_task_eval=4)
    with pytest.raises(ValueError, match="none to train on"):
        self_answers.split_corpus(answers[:1], train, test, heldout_fraction=0.5, n_task_train=1,
                                  n_task_loss=1, n_task_eval=1)
