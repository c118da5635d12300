"""Block padding, long-example handling and greedy packing into fixed-length rows.

An example is a dict with `tokens` [n] int32 and `loss_mask` [n] bool. Each
is padded to a multiple of the block size with `<|endoftext|>` (loss_mask
True: the model learns to end), so that every packed example starts on a
block boundary. Packing is grain's first-fit packer (`FirstFitPackIterDataset`):
examples are placed, in order, into the first of `num_bins` rows with room;
when one fits nowhere the rows are emitted. A packed row is the shared batch
contract for one row:

  tokens [seq_len] int32        (0 on row padding)
  segment_ids [seq_len] int32   (1, 2, ... per packed example; 0 on row padding)
  positions [seq_len] int32     (restart at 0 for every packed example, and
                                 at the row padding, which counts on like an
                                 example of its own: the TPU training kernel
                                 refuses other positions, see ops/pallas_tpu)
  loss_mask [seq_len] bool      (False on prompts and row padding)
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import grain
import numpy as np

LongExamples = Literal["raise", "split"]
LONG_EXAMPLE_POLICIES = ("raise", "split")
ROW_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


class ExampleTooLongError(ValueError):
    """An example does not fit in one packed row and splitting is off."""


def pad_to_block(
    tokens: np.ndarray, loss_mask: np.ndarray, block_size: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pads an example with `pad_id` (loss_mask True) to a multiple of block_size.

    Args:
      tokens: [n] int.
      loss_mask: [n] bool.

    Returns:
      (tokens [m] int32, loss_mask [m] bool) with m = ceil(n / B) * B.
    """
    n = len(tokens)
    extra = -n % block_size
    tokens = np.concatenate([np.asarray(tokens, np.int32), np.full(extra, pad_id, np.int32)])
    loss_mask = np.concatenate([np.asarray(loss_mask, bool), np.ones(extra, bool)])
    return tokens, loss_mask


class BlockPadAndFit(grain.experimental.FlatMapTransform):
    """Pads each example to a multiple of the block size and makes it fit one row.

    An example longer than `seq_len` raises ExampleTooLongError
    (`long_examples="raise"`) or is cut into consecutive pieces of `seq_len`
    tokens, each its own packed example with positions from 0
    (`long_examples="split"`; meant for pretraining text, where a piece without
    the preceding context is still a valid document). Nothing is dropped.
    """

    def __init__(self, block_size: int, seq_len: int, pad_id: int, long_examples: LongExamples):
        if block_size < 1 or seq_len < 1 or seq_len % block_size:
            raise ValueError(
                f"seq_len ({seq_len}) must be a positive multiple of block_size ({block_size})")
        if long_examples not in LONG_EXAMPLE_POLICIES:
            raise ValueError(
                f"long_examples is {long_examples!r}; expected one of {LONG_EXAMPLE_POLICIES}")
        self.block_size = block_size
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.long_examples = long_examples

    def flat_map(self, element: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
        tokens, loss_mask = element["tokens"], element["loss_mask"]
        n = len(tokens)
        if n == 0:
            return []
        if n > self.seq_len:
            if self.long_examples == "raise":
                raise ExampleTooLongError(
                    f"{element.get('_origin', 'an example')} has {n} tokens, more than seq_len="
                    f"{self.seq_len}; raise seq_len or set data.long_examples='split'")
            starts = range(0, n, self.seq_len)
        else:
            starts = range(0, 1)
        pieces = []
        for start in starts:
            piece_tokens, piece_mask = pad_to_block(
                tokens[start:start + self.seq_len], loss_mask[start:start + self.seq_len],
                self.block_size, self.pad_id)
            pieces.append({"tokens": piece_tokens, "loss_mask": piece_mask})
        return pieces


def _to_row(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Grain's packed element (`tokens_segment_ids`, ...) in the batch-contract names."""
    segment_ids = packed["tokens_segment_ids"].astype(np.int32)
    positions = packed["tokens_positions"].astype(np.int32)
    padding = segment_ids == 0  # grain pads at the end of the row, positions 0
    positions[padding] = np.arange(int(padding.sum()), dtype=np.int32)
    return {
        "tokens": packed["tokens"].astype(np.int32),
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": packed["loss_mask"].astype(bool),
    }


def pack(
    ds: grain.IterDataset, seq_len: int, num_bins: int, *, seed: int = 0, shuffle_bins: bool = False
) -> grain.IterDataset:
    """Packs examples (dicts with `tokens`, `loss_mask` of length <= seq_len) into rows.

    Args:
      ds: IterDataset of examples, each already padded to a multiple of the block size.
      seq_len: row length.
      num_bins: rows filled at once by the first-fit packer (more bins, less padding).
      seed, shuffle_bins: shuffle the order of the emitted rows of each group.

    Returns:
      IterDataset of rows (see the module docstring).
    """
    lengths = {"tokens": seq_len, "loss_mask": seq_len}
    packed = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=lengths, num_packing_bins=num_bins, seed=seed, shuffle_bins=shuffle_bins,
        padding_struct={"tokens": 0, "loss_mask": False},
    )
    return packed.map(_to_row)


def empty_rows(num_rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """All-padding rows (segment 0, positions 0, 1, ..., no loss), [num_rows, seq_len] each."""
    rows = {k: np.zeros((num_rows, seq_len), np.int32) for k in ROW_KEYS[:2]}
    rows["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (num_rows, seq_len)).copy()
    rows["loss_mask"] = np.zeros((num_rows, seq_len), bool)
    return rows


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Appends all-padding rows to a short final batch so every batch has batch_size rows."""
    rows = len(batch["tokens"])
    if rows == batch_size:
        return dict(batch)
    if rows > batch_size:
        raise ValueError(f"batch has {rows} rows, more than batch_size={batch_size}")
    filler = empty_rows(batch_size - rows, batch["tokens"].shape[1])
    return {k: np.concatenate([batch[k], filler[k]]) for k in ROW_KEYS}
