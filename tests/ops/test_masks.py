"""The mask index functions against a literal enumeration of spec §2 and the AR masks."""

import numpy as np
import jax.numpy as jnp
import pytest

from sdar_jax.ops import masks


def _packed_row(lengths, block_size, pad=0):
    """Positions and segment ids of one packed row: each example padded to whole blocks."""
    positions, segments = [], []
    for seg, length in enumerate(lengths, start=1):
        length = -(-length // block_size) * block_size
        positions += list(range(length))
        segments += [seg] * length
    positions += [0] * pad
    segments += [0] * pad
    return np.array(positions, np.int32), np.array(segments, np.int32)


def _spec_rule(q, k, pos, seg, half, block_size, causal_in_block=False):
    """Spec §2, literally: q and k index the 2L row [xt; x0]. With causal_in_block (spec
    §2.7), a query sees only the earlier positions of its own block in its own half."""
    if seg[q % half] != seg[k % half]:
        return False
    q_noisy, k_noisy = q < half, k < half
    q_pos, k_pos = pos[q % half], pos[k % half]
    q_blk, k_blk = q_pos // block_size, k_pos // block_size
    earlier = k_pos <= q_pos or not causal_in_block
    if q_noisy and k_noisy:
        return q_blk == k_blk and earlier
    if q_noisy and not k_noisy:
        return k_blk < q_blk
    if not q_noisy and not k_noisy:
        return k_blk < q_blk or (k_blk == q_blk and earlier)
    return False


@pytest.mark.parametrize("block_size,causal_in_block", [(1, False), (4, False), (8, False), (4, True)])
def test_block_diffusion_matches_the_four_rules(block_size, causal_in_block):
    pos_a, seg_a = _packed_row([5, 9, 3], block_size, pad=3)
    half = len(pos_a)
    pos_b, seg_b = np.arange(half, dtype=np.int32), np.ones(half, np.int32)  # one unpacked example
    positions = np.stack([np.tile(pos_a, 2), np.tile(pos_b, 2)])
    segments = np.stack([np.tile(seg_a, 2), np.tile(seg_b, 2)])
    got = np.asarray(
        masks.dense_mask(masks.block_diffusion(block_size, causal_in_block), jnp.asarray(positions),
                         jnp.asarray(positions), jnp.asarray(segments), jnp.asarray(segments))
    )
    for row, (pos, seg) in enumerate([(pos_a, seg_a), (pos_b, seg_b)]):
        want = np.array([[_spec_rule(q, k, pos, seg, half, block_size, causal_in_block)
                          for k in range(2 * half)]
                         for q in range(2 * half)])
        np.testing.assert_array_equal(got[row], want)
    # Every quadrant is exercised: the clean->noisy quadrant is empty, the others are not.
    assert not got[:, half:, :half].any()
    assert got[:, :half, :half].any() and got[:, :half, half:].any() and got[:, half:, half:].any()
    if causal_in_block:  # the clean half is then the plain causal mask of each example
        np.testing.assert_array_equal(got[:, half:, half:], np.asarray(masks.dense_mask(
            masks.causal(), jnp.asarray(positions[:, half:]), jnp.asarray(positions[:, half:]),
            jnp.asarray(segments[:, half:]), jnp.asarray(segments[:, half:]))))


@pytest.mark.parametrize("kind,block_size", [("causal", 1), ("block_causal", 4), ("bidirectional", 1)])
def test_ar_masks_match_enumeration(kind, block_size):
    pos, seg = _packed_row([6, 10], 4, pad=2)
    got = np.asarray(masks.dense_mask(masks.MaskSpec(kind, block_size), jnp.asarray(pos[None]),
                                      jnp.asarray(pos[None]), jnp.asarray(seg[None]), jnp.asarray(seg[None])))[0]
    n = len(pos)
    for q in range(n):
        for k in range(n):
            same = seg[q] == seg[k]
            rule = {"causal": pos[k] <= pos[q],
                    "block_causal": pos[k] // block_size <= pos[q] // block_size,
                    "bidirectional": True}[kind]
            assert got[q, k] == (same and rule), (q, k)


def test_block_causal_against_a_cache():
    """Decoding: a block's queries at absolute positions see the cache prefix and their block."""
    block_size, max_len = 4, 20
    q_pos = np.array([[8, 9, 10, 11], [0, 1, 2, 3]], np.int32)
    kv_pos = np.broadcast_to(np.arange(max_len, dtype=np.int32), (2, max_len))
    got = np.asarray(masks.dense_mask(masks.block_causal(block_size), jnp.asarray(q_pos), jnp.asarray(kv_pos)))
    np.testing.assert_array_equal(got[0], np.broadcast_to(np.arange(max_len) < 12, (4, max_len)))
    np.testing.assert_array_equal(got[1], np.broadcast_to(np.arange(max_len) < 4, (4, max_len)))


def test_causal_in_block_block_causal_is_the_causal_mask():
    pos, seg = _packed_row([6, 10], 4, pad=2)
    ids = [jnp.asarray(a[None]) for a in (pos, pos, seg, seg)]
    np.testing.assert_array_equal(np.asarray(masks.dense_mask(masks.block_causal(4, True), *ids)),
                                  np.asarray(masks.dense_mask(masks.causal(), *ids)))


def test_bad_mask_arguments_raise():
    with pytest.raises(ValueError, match="kind"):
        masks.MaskSpec("sliding")
    with pytest.raises(ValueError, match="block_size"):
        masks.MaskSpec("block_causal", 0)
    pos = jnp.zeros((1, 6), jnp.int32)
    with pytest.raises(ValueError, match="q_len"):
        masks.dense_mask(masks.block_diffusion(2), pos, jnp.zeros((1, 8), jnp.int32))
