"""The embedded task suite: determinism, verifiable answers, disjoint splits, shipped files."""

import filecmp
import os
import re

import pytest

from sdar_jax.data import tasks


@pytest.fixture(scope="module")
def small_splits():
    return tasks.generate_splits(seed=3, n_train=300, n_test=50)


def _recompute(example: dict) -> str:
    """The answer computed from the prompt alone, independently of the generator."""
    task, prompt = example["task"], example["prompt"]
    if task == "add":
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=\?", prompt).groups())
        return str(a + b)
    if task == "mul":
        a, b = map(int, re.fullmatch(r"(\d+)\*(\d+)=\?", prompt).groups())
        return str(a * b)
    if task == "sort":
        return " ".join(sorted(prompt.removeprefix("sort: ").split()))
    if task == "word":
        m = re.fullmatch(r"[a-z]+ has (\d+) [a-z]+, gets (\d+) more, eats (\d+)\. how many\?", prompt)
        if m:
            a, b, c = map(int, m.groups())
            return str(a + b - c)
        a, b, c = map(int, re.fullmatch(
            r"[a-z]+ has (\d+) bags of (\d+) [a-z]+, eats (\d+)\. how many\?", prompt).groups())
        return str(a * b - c)
    raise AssertionError(f"unknown task {task}")


def test_deterministic_for_a_seed(small_splits):
    assert tasks.generate_splits(seed=3, n_train=300, n_test=50) == small_splits
    other = tasks.generate_splits(seed=4, n_train=300, n_test=50)
    assert other[0] != small_splits[0]


def test_counts_fields_and_lengths(small_splits):
    train, test = small_splits
    for split, n in ((train, 300), (test, 50)):
        assert [e["task"] for e in split] == [t for t in tasks.TASKS for _ in range(n)]
        for e in split:
            assert set(e) == set(tasks.FIELDS)
            assert len(e["prompt"]) + len(e["response"]) <= 80, e
            assert e["response"].splitlines()[-1] == f"#### {e['answer']}"


def test_answers_recompute(small_splits):
    for e in small_splits[0] + small_splits[1]:
        assert e["answer"] == _recompute(e), e
        if e["task"] == "word":
            assert int(e["answer"]) >= 0


def test_worked_steps_are_true_equations(small_splits):
    for e in small_splits[0]:
        for line in e["response"].splitlines()[:-1]:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs), (line, e)  # lines hold only digits and + - *


def test_addition_steps_carry_right_to_left():
    assert tasks.addition_steps(957, 68) == ["7+8=15", "5+6+1=12", "9+1=10"]
    assert tasks.addition_steps(300, 5) == ["0+5=5", "0=0", "3=3"]
    assert tasks.multiplication_steps(47, 36) == ["47*6=282", "47*30=1410", "282+1410=1692"]
    assert tasks.multiplication_steps(47, 6) == ["47*6=282"]


def test_splits_disjoint_and_prompts_unique(small_splits):
    train, test = small_splits
    train_prompts = [e["prompt"] for e in train]
    test_prompts = [e["prompt"] for e in test]
    assert len(set(train_prompts)) == len(train_prompts)
    assert len(set(test_prompts)) == len(test_prompts)
    assert not set(train_prompts) & set(test_prompts)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'div'"):
        tasks.generate_splits(0, 1, 1, tasks=("add", "div"))
    with pytest.raises(ValueError, match="n_train"):
        tasks.generate_splits(0, -1, 1)

    def always_the_same(rng):
        return {"task": "sort", "prompt": "sort: 2 1", "response": "#### 1 2", "answer": "1 2"}

    with pytest.raises(ValueError, match="'sort'.*could not draw 3"):
        tasks._draw_unique(always_the_same, None, 3, set(), "sort", max_misses=5)


def test_shipped_files_equal_regeneration(tmp_path):
    tasks.main(["--out", str(tmp_path), "--seed", str(tasks.DEFAULT_SEED),
                "--n-train", str(tasks.DEFAULT_N_TRAIN), "--n-test", str(tasks.DEFAULT_N_TEST)])
    for split in ("train", "test"):
        shipped = os.path.join(tasks.TASK_DIR, f"{split}.jsonl")
        assert filecmp.cmp(tmp_path / f"{split}.jsonl", shipped, shallow=False), split
    test = tasks.load_split("test")
    assert len(test) == len(tasks.TASKS) * tasks.DEFAULT_N_TEST
    assert tasks.load_split("test", tasks=("sort",)) == [e for e in test if e["task"] == "sort"]
    assert os.path.getsize(os.path.join(tasks.TASK_DIR, "train.jsonl")) < 2_000_000


def test_read_jsonl_names_missing_fields(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"task": "add", "prompt": "1+1=?"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1.*\['response', 'answer'\]"):
        tasks.read_jsonl(str(path))


