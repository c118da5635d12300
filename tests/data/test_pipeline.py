"""The grain pipeline: sources, tokenisation, determinism, resumption, process sharding."""

import json

import numpy as np
import pytest

from sdar_jax.data import pipeline, sources
from sdar_jax.data.packing import ExampleTooLongError
from sdar_jax.data.tokenizer import load_char_tokenizer

B, SEQ = 4, 48


@pytest.fixture(scope="module")
def tok():
    return load_char_tokenizer()


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def texts(n, prefix="doc"):
    return [f"{prefix} {i}: " + "ab" * (i % 5) for i in range(n)]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl",
                       [{"text": t} for t in texts(40)])


def segments(batch):
    """Every packed example of a batch as (tokens, loss_mask) in row order."""
    out = []
    for row in range(len(batch["tokens"])):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            cols = seg == s
            out.append((batch["tokens"][row][cols], batch["loss_mask"][row][cols]))
    return out


def decoded_texts(batches, tok):
    eos = tok.token_to_id(pipeline.EOS_TOKEN)
    found = []
    for batch in batches:
        for tokens, _ in segments(batch):
            tokens = tokens[tokens != eos]
            found.append(tok.decode(tokens))
    return found


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_text_examples(text_file, tok):
    cfg = {"train_path": text_file, "shuffle": False, "num_epochs": 1}
    it = pipeline.make_train_iterator(cfg, tok, B, SEQ, 4, seed=0, shard=(0, 1))
    batch = next(it)
    assert batch["tokens"].shape == (4, SEQ) and batch["tokens"].dtype == np.int32
    assert batch["loss_mask"].dtype == bool
    eos = tok.token_to_id("<|endoftext|>")
    first_tokens, first_mask = segments(batch)[0]
    want = tok.encode(texts(1)[0]) + [eos]
    want += [eos] * (-len(want) % B)
    np.testing.assert_array_equal(first_tokens, want)
    assert first_mask.all()  # pretraining: everything, block padding included, is trained


def test_sft_examples(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "2+2?", "response": "4"},
                                                 {"prompt": "Say hi", "response": "hi there"}])
    cfg = {"train_path": path, "shuffle": False, "num_epochs": 1}
    batch = next(pipeline.make_train_iterator(cfg, tok, B, SEQ, 2, seed=0, shard=(0, 1)))
    tokens, mask = segments(batch)[0]
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "2+2?"}],
                                                add_generation_prompt=True))
    answer = tok.encode("4") + [tok.token_to_id("<|im_end|>")]
    eos = tok.token_to_id("<|endoftext|>")
    n = len(prompt) + len(answer)
    np.testing.assert_array_equal(tokens[:n], prompt + answer)
    assert (tokens[n:] == eos).all() and len(tokens) % B == 0
    assert not mask[:len(prompt)].any()  # the prompt is never noised and carries no loss
    assert mask[len(prompt):].all()
    assert tok.decode(tokens[:len(prompt)]).endswith("<|im_start|>assistant\n")


def test_numpy_and_array_record_sources(tmp_path, tok):
    rows = np.arange(6 * 8, dtype=np.int32).reshape(6, 8) % 90 + 6
    np.save(tmp_path / "a.npy", rows)
    stream = np.arange(100, dtype=np.int64) % 90 + 6
    np.save(tmp_path / "b.npy", stream)
    src = sources.open_source(str(tmp_path / "a.npy"), chunk_len=SEQ)
    assert len(src) == 6
    np.testing.assert_array_equal(src[2]["tokens"], rows[2])
    stream_src = sources.open_source(str(tmp_path / "b.npy"), chunk_len=SEQ)
    assert len(stream_src) == 3  # 48 + 48 + 4: the tail is kept
    np.testing.assert_array_equal(stream_src[2]["tokens"], stream[96:])
    both = sources.open_source(f"{tmp_path}/a.npy,{tmp_path}/b.npy", chunk_len=SEQ)
    assert len(both) == 9 and both[7]["_origin"].endswith("b.npy#1")

    ar_path = str(tmp_path / "c.array_record")
    records = [{"text": "hello"}, {"prompt": "p", "response": "r"},
               {"tokens": [7, 8, 9], "loss_mask": [False, True, True]}]
    assert sources.write_array_record(ar_path, records) == 3
    ar = sources.open_source(ar_path, chunk_len=SEQ)
    assert len(ar) == 3 and ar[2]["tokens"] == [7, 8, 9]
    batch = next(pipeline.make_train_iterator(
        {"train_path": ar_path, "shuffle": False, "num_epochs": 1}, tok, B, SEQ, 1, 0, shard=(0, 1)))
    tokens, mask = segments(batch)[2]
    eos = tok.token_to_id("<|endoftext|>")
    np.testing.assert_array_equal(tokens, [7, 8, 9, eos])
    np.testing.assert_array_equal(mask, [False, True, True, True])


def test_deterministic_for_a_seed(text_file, tok):
    cfg = {"train_path": text_file}
    make = lambda seed: pipeline.make_train_iterator(cfg, tok, B, SEQ, 4, seed, shard=(0, 1))  # noqa: E731
    first = take(make(3), 6)
    assert_batches_equal(first, take(make(3), 6))
    other = take(make(4), 6)
    assert any(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))


def test_state_round_trip_mid_epoch(text_file, tok):
    cfg = {"train_path": text_file}
    make = lambda: pipeline.make_train_iterator(cfg, tok, B, SEQ, 4, 5, shard=(0, 1))  # noqa: E731
    it = make()
    take(it, 3)
    state = it.get_state()
    json.dumps(state)  # the state is plain JSON (it goes into the checkpoint)
    # 40 records make a few batches per epoch: the next 8 batches cross epoch boundaries.
    expected = take(it, 8)
    resumed = make()
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 8), expected)
    # The resumed stream is not just the start over again.
    assert not np.array_equal(take(make(), 1)[0]["tokens"], expected[0]["tokens"])


def test_one_epoch_covers_every_record_once(text_file, tok):
    cfg = {"train_path": text_file, "num_epochs": 1}
    it = pipeline.make_train_iterator(cfg, tok, B, SEQ, 2, 0, shard=(0, 1))
    found = decoded_texts(list(it), tok)
    # drop_remainder only drops a last partial batch; everything else appears exactly once.
    assert len(found) == len(set(found)) and set(found) <= set(texts(40))
    assert len(found) >= 40 - 2 * 2


def test_process_shards_are_disjoint(text_file, tok):
    cfg = {"train_path": text_file, "num_epochs": 1, "packing_bins": 8}
    found = []
    for index in range(2):
        it = pipeline.make_train_iterator(cfg, tok, B, SEQ, 2, 0, shard=(index, 2))
        found.append(decoded_texts(list(it), tok))
    assert set(found[0]).isdisjoint(found[1])
    assert len(found[0]) > 10 and len(found[1]) > 10


def test_eval_iterator(tmp_path, text_file, tok):
    cfg = {"eval_path": text_file}
    batches = list(pipeline.make_eval_iterator(cfg, tok, B, SEQ, 4, shard=(0, 1)))
    found = decoded_texts(batches, tok)
    assert sorted(found) == sorted(texts(40))  # one full pass, nothing dropped or repeated
    assert all(b["tokens"].shape == (4, SEQ) for b in batches)
    assert_batches_equal(batches, list(pipeline.make_eval_iterator(cfg, tok, B, SEQ, 4,
                                                                   shard=(0, 1))))
    fixed = list(pipeline.make_eval_iterator(cfg, tok, B, SEQ, 4, num_batches=len(batches) + 3,
                                             shard=(1, 2)))
    assert len(fixed) == len(batches) + 3


def test_errors(tmp_path, tok):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "no"}])
    cfg = {"train_path": bad, "shuffle": False}
    it = pipeline.make_train_iterator(cfg, tok, B, SEQ, 2, 0, shard=(0, 1))
    with pytest.raises(sources.DataSourceError, match=r"bad.jsonl:2: record has fields \['body'\]"):
        next(it)
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "x" * (SEQ + 1)}])
    with pytest.raises(ExampleTooLongError, match="long.jsonl:1 has"):
        next(pipeline.make_train_iterator({"train_path": long}, tok, B, SEQ, 1, 0, shard=(0, 1)))
    split = pipeline.make_train_iterator({"train_path": long, "long_examples": "split"}, tok, B,
                                         SEQ, 1, 0, shard=(0, 1))
    assert next(split)["loss_mask"].sum() > 0
    with pytest.raises(pipeline.DataConfigError, match="unknown data config fields"):
        pipeline.make_train_iterator({"train_path": bad, "shufle": False}, tok, B, SEQ, 2, 0)
    with pytest.raises(pipeline.DataConfigError, match="multiple of the process count"):
        pipeline.make_train_iterator({"train_path": bad}, tok, B, SEQ, 3, 0, shard=(0, 2))
    with pytest.raises(sources.DataSourceError, match="matches no file"):
        pipeline.make_train_iterator({"train_path": str(tmp_path / "none*.jsonl")}, tok, B, SEQ, 2, 0)
    # A run config's data section (trainer keys included) is accepted as is.
    run_data = {"train_path": bad, "seq_len": SEQ, "global_batch_size": 2, "seed": 0,
                "tokenizer_dir": "x", "worker_count": 0}
    assert pipeline.DataConfig.from_config(run_data).train_path == bad


def test_example_transform_pickles_for_workers(tok):
    import pickle

    transform = pipeline.RecordToExample(tok)
    clone = pickle.loads(pickle.dumps(transform))  # grain workers receive the pipeline pickled
    record = {"prompt": "p?", "response": "r", "_origin": "x:1"}
    for key, value in transform.map(record).items():
        np.testing.assert_array_equal(clone.map(record)[key], value)


# ---- malformed records: "error" names file:line, "skip" drops and counts ----------------


def _with_bad_lines(tmp_path, good, bad_at):
    """A JSONL file of `good` text records with malformed lines inserted at 1-based `bad_at`."""
    lines, records = [], iter(good)
    for number in range(1, len(good) + len(bad_at) + 1):
        if number in bad_at:
            lines.append('{"text": "unterminated' if number % 2 else '{"txt": "wrong field"}')
        else:
            lines.append(json.dumps({"text": next(records)}))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_malformed_line_deep_in_the_file_raises_naming_it(tmp_path, tok):
    path = _with_bad_lines(tmp_path, texts(40), bad_at={31})
    config = {"train_path": path, "shuffle": False, "read_threads": 1}
    it = pipeline.make_train_iterator(config, tok, 4, SEQ, B, seed=0)
    with pytest.raises(sources.DataSourceError, match=f"{path}:31: invalid JSON"):
        for _ in range(100):
            next(it)


def test_skip_policy_drops_and_counts_malformed_records(tmp_path, tok, text_file):
    path = _with_bad_lines(tmp_path, texts(40), bad_at={7, 31, 40})
    counter = pipeline.BadRecordCounter()
    skipping = pipeline.make_train_iterator(
        {"train_path": path, "shuffle": False, "read_threads": 2, "num_epochs": 1,
         "on_bad_record": "skip"}, tok, 4, SEQ, B, seed=0, bad_records=counter)
    clean = pipeline.make_train_iterator(
        {"train_path": text_file, "shuffle": False, "read_threads": 2, "num_epochs": 1}, tok, 4, SEQ, B, seed=0)
    got, want = list(skipping), list(clean)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert counter.count == 3  # one pass: each malformed line once


def test_bad_record_policy_is_validated():
    with pytest.raises(pipeline.DataConfigError, match="on_bad_record is 'ignore'"):
        pipeline.DataConfig(on_bad_record="ignore")
    with pytest.raises(pipeline.DataConfigError, match="worker_count=0"):
        pipeline.DataConfig(on_bad_record="skip", worker_count=2)
