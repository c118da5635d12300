"""Block padding, long-example handling and packing invariants."""

import grain
import numpy as np
import pytest

from sdar_jax.data import packing

B, SEQ, PAD = 4, 32, 1


def test_pad_to_block():
    tokens, mask = packing.pad_to_block(np.arange(10, 15), np.array([0, 0, 1, 1, 1], bool), B, PAD)
    np.testing.assert_array_equal(tokens, [10, 11, 12, 13, 14, PAD, PAD, PAD])
    np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1, 1, 1, 1])
    assert tokens.dtype == np.int32 and mask.dtype == bool
    same, _ = packing.pad_to_block(np.arange(8), np.ones(8, bool), B, PAD)
    np.testing.assert_array_equal(same, np.arange(8))


def example(n, n_prompt=0, start=100):
    return {"tokens": np.arange(start, start + n, dtype=np.int32),
            "loss_mask": np.arange(n) >= n_prompt, "_origin": f"ex{start}"}


def test_long_examples_raise_or_split():
    fit = packing.BlockPadAndFit(B, SEQ, PAD, "raise")
    (piece,) = fit.flat_map(example(SEQ - 1))
    assert len(piece["tokens"]) == SEQ
    with pytest.raises(packing.ExampleTooLongError, match="ex100 has 33 tokens"):
        fit.flat_map(example(SEQ + 1))
    split = packing.BlockPadAndFit(B, SEQ, PAD, "split")
    pieces = split.flat_map(example(2 * SEQ + 5, n_prompt=3))
    assert [len(p["tokens"]) for p in pieces] == [SEQ, SEQ, 8]
    joined = np.concatenate([p["tokens"] for p in pieces])
    np.testing.assert_array_equal(joined[: 2 * SEQ + 5], np.arange(100, 100 + 2 * SEQ + 5))
    np.testing.assert_array_equal(joined[2 * SEQ + 5:], [PAD] * 3)  # nothing dropped or truncated
    np.testing.assert_array_equal(pieces[0]["loss_mask"][:4], [0, 0, 0, 1])
    assert split.flat_map(example(0)) == []
    with pytest.raises(ValueError, match="multiple of block_size"):
        packing.BlockPadAndFit(B, 30, PAD, "raise")
    with pytest.raises(ValueError, match="long_examples"):
        packing.BlockPadAndFit(B, SEQ, PAD, "truncate")


def test_packing_invariants():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(1, SEQ // 2, size=56), [SEQ, SEQ - 3, 1, SEQ]])
    prompts = [int(rng.integers(0, n)) for n in lengths]
    examples = [example(int(n), p, start=1000 * (i + 1)) for i, (n, p) in enumerate(zip(lengths, prompts))]
    fit = packing.BlockPadAndFit(B, SEQ, PAD, "raise")
    ds = grain.experimental.FlatMapIterDataset(grain.MapDataset.source(examples).to_iter_dataset(), fit)
    rows = list(packing.pack(ds, SEQ, num_bins=3))
    seen = []
    for row in rows:
        assert set(row) == set(packing.ROW_KEYS)
        seg, pos, tok, mask = row["segment_ids"], row["positions"], row["tokens"], row["loss_mask"]
        assert seg.shape == (SEQ,) and seg.dtype == np.int32 and mask.dtype == bool
        ids = [s for s in np.unique(seg) if s != 0]
        assert ids == list(range(1, len(ids) + 1))
        for s in ids:
            cols = np.flatnonzero(seg == s)
            assert cols[0] % B == 0 and len(cols) % B == 0  # starts on a block boundary
            assert np.all(np.diff(cols) == 1)  # contiguous
            np.testing.assert_array_equal(pos[cols], np.arange(len(cols)))  # positions restart
            first = tok[cols[0]]
            ex = examples[first // 1000 - 1]
            n = len(ex["tokens"])
            np.testing.assert_array_equal(tok[cols[:n]], ex["tokens"])
            np.testing.assert_array_equal(mask[cols[:n]], ex["loss_mask"])
            assert (tok[cols[n:]] == PAD).all() and mask[cols[n:]].all()  # trained block padding
            seen.append(first)
        padding = seg == 0
        assert not mask[padding].any() and (tok[padding] == 0).all()
        np.testing.assert_array_equal(pos[padding], np.arange(padding.sum()))  # like an example
        # Row padding only at the end of a row.
        if padding.any():
            assert padding[np.argmax(padding):].all()
    assert sorted(seen) == [1000 * (i + 1) + 0 for i in range(len(examples))]
    # Several examples per row on average: packing happened.
    assert len(rows) < len(examples) / 2


def test_pad_batch():
    rows = packing.empty_rows(2, SEQ)
    rows["tokens"][:] = 7
    rows["segment_ids"][:] = 1
    padded = packing.pad_batch(rows, 5)
    assert padded["tokens"].shape == (5, SEQ)
    assert (padded["tokens"][2:] == 0).all() and (padded["segment_ids"][2:] == 0).all()
    assert not padded["loss_mask"][2:].any()
    with pytest.raises(ValueError, match="more than batch_size"):
        packing.pad_batch(rows, 1)
