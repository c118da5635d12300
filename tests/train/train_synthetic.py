"""Shared pieces of the trainer tests (imported as `train_synthetic`): a tiny run config and a synthetic grain source.

The synthetic source is a learnable packed-batch stream following the shared
batch contract: each row packs two examples of 16 tokens (an arithmetic
progression over 24 token ids), the first block of each example is a prompt
(loss_mask False), and every row ends with 4 padding tokens (segment 0).
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np

from sdar_jax.train.config import base_config

VOCAB = 64
MASK_ID = 63
SEQ_LEN = 36
EXAMPLE_LEN = 16
PROMPT_LEN = 4


def synthetic_rows(num_rows: int, seed: int) -> dict[str, np.ndarray]:
    """[num_rows, SEQ_LEN] arrays: tokens, segment_ids, positions (int32), loss_mask (bool)."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((num_rows, SEQ_LEN), np.int32)
    segment_ids = np.zeros((num_rows, SEQ_LEN), np.int32)
    positions = np.zeros((num_rows, SEQ_LEN), np.int32)
    loss_mask = np.zeros((num_rows, SEQ_LEN), bool)
    for row in range(num_rows):
        for seg in range(2):
            start, stride = rng.integers(0, 24), rng.integers(1, 4)
            span = slice(seg * EXAMPLE_LEN, (seg + 1) * EXAMPLE_LEN)
            tokens[row, span] = 8 + (start + stride * np.arange(EXAMPLE_LEN)) % 24
            segment_ids[row, span] = seg + 1
            positions[row, span] = np.arange(EXAMPLE_LEN)
            loss_mask[row, span] = np.arange(EXAMPLE_LEN) >= PROMPT_LEN
    return dict(tokens=tokens, segment_ids=segment_ids, positions=positions, loss_mask=loss_mask)


def synthetic_iterator(
    batch_size: int = 8, seed: int = 0, num_rows: int = 64, poison_batch: int | None = None
):
    """A grain DatasetIterator of shuffled, repeated batches (get_state / set_state work).

    poison_batch: the index of a batch whose tokens are set out of the
    vocabulary (the embedding lookup then yields NaN: a non-finite loss).
    """
    rows = synthetic_rows(num_rows, seed)
    ds = (
        grain.MapDataset.range(num_rows)
        .shuffle(seed=seed)
        .repeat()
        .map(lambda i: {k: v[i] for k, v in rows.items()})
        .batch(batch_size)
    )
    if poison_batch is not None:

        def poison(index: int, batch: dict) -> dict:
            if index == poison_batch:
                return {**batch, "tokens": np.full_like(batch["tokens"], VOCAB + 7)}
            return batch

        ds = ds.map_with_index(poison)
    return iter(ds.to_iter_dataset())


def tiny_config(workdir: str | None = None, **train_overrides) -> ml_collections.ConfigDict:
    """A run config for a 2-layer, 32-wide SDAR model on the synthetic source."""
    config = base_config()
    config.model.preset = "tiny"
    config.model.overrides.update(dict(
        vocab_size=VOCAB, mask_token_id=MASK_ID, hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, intermediate_size=64,
    ))
    config.data.seq_len = SEQ_LEN
    config.data.global_batch_size = 8
    config.optimizer.update(peak_lr=3e-3, warmup_steps=2, end_lr_ratio=0.1, weight_decay=0.01)
    config.train.update(
        steps=6, log_every=1, eval_every=3, eval_batches=2, checkpoint_every=2, keep=5,
        workdir=workdir, export=False, progress_bar=False,
    )
    config.train.update(train_overrides)
    return config
