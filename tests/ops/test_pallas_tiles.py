"""The tile-skipping tables: exactly the empty tiles are skipped, and there are many."""

import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.ops import masks, tiles
from tests.ops import pallas_cases as cases


def _brute_force_nonempty(dense: np.ndarray, block_q: int, block_k: int) -> np.ndarray:
    batch, q_len, kv_len = dense.shape
    out = np.zeros((batch, q_len // block_q, kv_len // block_k), bool)
    for b in range(batch):
        for i in range(q_len // block_q):
            for j in range(kv_len // block_k):
                out[b, i, j] = dense[b, i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k].any()
    return out


@pytest.mark.parametrize("mask,block_q,block_k", [
    (masks.block_diffusion(4), 16, 16),
    (masks.block_diffusion(16), 8, 32),
    (masks.causal(), 16, 8),
    (masks.block_causal(8), 32, 16),
])
def test_tile_mask_equals_brute_force(mask, block_q, block_k):
    ids = cases.training_inputs(7, mask=mask, batch=2, length=128, n_segments=3, pad_blocks=1)
    row = ids.q_positions.shape[1]
    got, got_full = map(np.asarray, tiles.tile_masks(
        mask, ids.q_positions, ids.kv_positions, ids.q_segment_ids, ids.kv_segment_ids,
        block_q=block_q, block_k=block_k, noisy_len=row // 2))
    dense = np.asarray(ids.dense())
    want = _brute_force_nonempty(dense, block_q, block_k)
    np.testing.assert_array_equal(got, want)
    want_full = ~_brute_force_nonempty(~dense, block_q, block_k)
    np.testing.assert_array_equal(got_full, want_full)
    assert want_full.any() and (want & ~want_full).any()  # both kinds of tile occur
    # The kernels loop over exactly the non-empty tiles; a good share are skipped.
    ids, counts = tiles.compact(jnp.asarray(got))
    np.testing.assert_array_equal(np.asarray(counts), want.sum(-1))
    for b in range(want.shape[0]):
        for i in range(want.shape[1]):
            n = int(counts[b, i])
            np.testing.assert_array_equal(np.asarray(ids[b, i, :n]), np.flatnonzero(want[b, i]))
            assert (np.asarray(ids[b, i, n:]) == (np.flatnonzero(want[b, i])[-1] if n else 0)).all()
    assert want.mean() < 0.75, f"expected many empty tiles, only {1 - want.mean():.0%} are"
    # compact_split lists the full tiles first, then the partial ones, each ascending.
    ids, n_full, counts = map(np.asarray, tiles.compact_split(jnp.asarray(want), jnp.asarray(want_full)))
    np.testing.assert_array_equal(counts, want.sum(-1))
    np.testing.assert_array_equal(n_full, want_full.sum(-1))
    for b in range(want.shape[0]):
        for i in range(want.shape[1]):
            f, n = n_full[b, i], counts[b, i]
            np.testing.assert_array_equal(ids[b, i, :f], np.flatnonzero(want_full[b, i]))
            np.testing.assert_array_equal(ids[b, i, f:n], np.flatnonzero(want[b, i] & ~want_full[b, i]))


def test_block_diffusion_skips_three_quarters_of_the_tiles_at_long_rows():
    """One 4k-token example ([xt; x0] row of 8k), B = 4, 128 x 128 tiles: about three quarters
    of the tiles are empty (a causal kernel over the same row would skip about half)."""
    length = 4096
    pos = jnp.tile(jnp.arange(length, dtype=jnp.int32), 2)[None]
    seg = jnp.ones_like(pos)
    nonempty = tiles.tile_mask(masks.block_diffusion(4), pos, pos, seg, seg,
                               block_q=128, block_k=128, noisy_len=length)
    empty = 1.0 - float(nonempty.mean())
    # noisy->noisy: only the 32 diagonal tiles; noisy->clean and clean->clean: lower triangles.
    n = length // 128
    want_nonempty = n + 2 * (n * (n + 1) // 2)
    assert int(nonempty.sum()) == want_nonempty
    assert 0.72 < empty < 0.74


def test_fold_unfold_roundtrip_and_layout():
    x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)  # 4 heads, 2 kv heads
    folded = tiles.fold_heads(x, 2)
    assert folded.shape == (2, 2, 6, 5)
    # row i * groups + g of kv head h is query i of head h * groups + g.
    np.testing.assert_array_equal(folded[1, 1, 2 * 2 + 1], x[1, 2, 1 * 2 + 1])
    np.testing.assert_array_equal(tiles.unfold_heads(folded, 3), x)


def test_tile_mask_rejects_ragged_tiles():
    pos = jnp.zeros((1, 10), jnp.int32)
    with pytest.raises(ValueError, match="multiples"):
        tiles.tile_mask(masks.causal(), pos, pos, pos, pos, block_q=4, block_k=4, noisy_len=5)
