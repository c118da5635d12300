"""The procedural task stream: deterministic, never a test prompt, resumable through grain."""

import numpy as np
import pytest

from sdar_jax.data import pipeline, procedural, sources, tasks
from sdar_jax.data.tokenizer import CHAR_TOKENIZER_DIR


def test_records_are_deterministic_and_cycle_tasks():
    source = procedural.ProceduralTaskSource(("add", "sort", "word"), seed=3)
    again = procedural.ProceduralTaskSource(("add", "sort", "word"), seed=3)
    other = procedural.ProceduralTaskSource(("add", "sort", "word"), seed=4)
    records = [source[i] for i in range(30)]
    assert [r["task"] for r in records] == ["add", "sort", "word"] * 10
    assert records == [again[i] for i in range(30)]
    assert [r["prompt"] for r in records] != [other[i]["prompt"] for i in range(30)]
    for r in records:  # a well-formed, correct problem
        assert r["response"].endswith(f"#### {r['answer']}")
    assert len(source) == procedural.NUM_RECORDS
    assert source[procedural.NUM_RECORDS - 1]["task"] in ("add", "sort", "word")
    with pytest.raises(IndexError):
        source[procedural.NUM_RECORDS]


def test_never_yields_an_excluded_prompt():
    # word problems live in a small prompt space: exclude a tenth of what the stream would give.
    plain = procedural.ProceduralTaskSource(("word",), exclude=())
    excluded = {plain[i]["prompt"] for i in range(0, 3000, 10)}
    source = procedural.ProceduralTaskSource(("word",), exclude=excluded)
    prompts = [source[i]["prompt"] for i in range(3000)]
    assert not set(prompts) & excluded
    # Records the exclusion does not touch are unchanged.
    assert prompts[1] == plain[1]["prompt"]
    # By default, the shipped test split (every task) is excluded.
    test = procedural.test_prompts()
    assert len(test) == len(tasks.load_split("test"))
    default = procedural.ProceduralTaskSource(tasks.TASKS)
    assert default.exclude == test
    assert not {default[i]["prompt"] for i in range(4000)} & test


def test_spec_parsing_and_errors():
    src = sources.open_source("procedural:add,sort@seed=7", chunk_len=128)
    assert isinstance(src, procedural.ProceduralTaskSource)
    assert src.tasks == ("add", "sort") and src.seed == 7
    assert procedural.spec_for(("add", "word"), 2) == "procedural:add,word@seed=2"
    assert procedural.spec_for(("add",)) == "procedural:add"
    for bad, match in [("procedural:", "non-empty subset"), ("procedural:add,div", "div"),
                       ("procedural:add@sed=1", "seed=N"), ("procedural:add@seed=x", "seed=N")]:
        with pytest.raises(procedural.ProceduralSpecError, match=match):
            sources.open_source(bad, chunk_len=128)


def test_pipeline_stream_resumes_exactly():
    cfg = {"train_path": "procedural:add,sort,word@seed=1", "read_threads": 1}

    def make():
        return pipeline.make_train_iterator(cfg, CHAR_TOKENIZER_DIR, 4, 128, 4, seed=0,
                                            shard=(0, 1))

    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    resumed = make()
    resumed.set_state(state)
    for a, b in zip(want, [next(resumed) for _ in range(3)]):
        for key in pipeline_keys():
            np.testing.assert_array_equal(a[key], b[key])
    assert want[0]["loss_mask"].any() and (want[0]["segment_ids"] > 0).any()


def pipeline_keys():
    return ("tokens", "segment_ids", "positions", "loss_mask")
