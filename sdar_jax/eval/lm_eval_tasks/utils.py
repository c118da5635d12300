"""Helpers of sdar_tasks.yaml (lm-eval loads this file by path, next to the YAML)."""

from __future__ import annotations

from typing import Any

import datasets

from sdar_jax.data import tasks
from sdar_jax.eval import answers


def load_test_split(**metadata: Any) -> datasets.DatasetDict:
    """The shipped test split as {"test": Dataset}.

    lm-eval passes the task's metadata and every model argument here; none of
    them changes which problems are read.
    """
    del metadata
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(tasks.load_split("test"))})


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """acc: `answers.is_correct(generation, doc["answer"], "gsm8k")` (evaluate.py's default style)."""
    return {"acc": float(answers.is_correct(results[0], doc["answer"], "gsm8k"))}
