"""sdar_jax.ops.grouped_matmul: the tiled loop against jax.lax.ragged_dot, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.ops import grouped_matmul as gm


@pytest.mark.parametrize(
    "group_sizes,tile",
    [
        ([10, 0, 33, 1, 0, 20], 8),  # empty groups, boundaries inside tiles, 13 trailing rows
        ([10, 0, 33, 1, 0, 20], 128),  # one tile holds every group
        ([0, 0, 0, 0, 0, 0], 16),  # nothing routed: all zeros
        ([16, 16, 0, 16, 16, 13], 16),  # boundaries on tile edges, M not a tile multiple
    ],
)
def test_tiled_matches_ragged_dot(group_sizes, tile):
    key_x, key_w, key_c = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (77, 8))
    w = jax.random.normal(key_w, (6, 8, 5))
    cotangent = jax.random.normal(key_c, (77, 5))
    sizes = jnp.array(group_sizes, jnp.int32)

    def run(impl):
        out, vjp = jax.vjp(lambda x, w: gm.grouped_matmul(x, w, sizes, impl=impl, tile=tile), x, w)
        return (out, *vjp(cotangent))

    for got, want in zip(run("tiled"), run("ragged_dot")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    out = run("tiled")[0]
    assert float(jnp.abs(out[int(sizes.sum()):]).max(initial=0.0)) == 0.0


def test_work_items_cover_each_group_tile_once():
    sizes = jnp.array([5, 0, 12, 3], jnp.int32)  # rows 0-4 | - | 5-16 | 17-19, tile 4
    items = gm._work_items(sizes, num_tiles=5, tile=4)
    count = int(items.count)
    pairs = list(zip(np.asarray(items.group)[:count].tolist(), np.asarray(items.tile)[:count].tolist()))
    assert pairs == [(0, 0), (0, 1), (2, 1), (2, 2), (2, 3), (2, 4), (3, 4)]
    assert count <= items.group.shape[0] == 5 + 4 - 1


def test_rejects_bad_shapes_and_impl():
    x, w = jnp.zeros((4, 3)), jnp.zeros((2, 5, 6))
    with pytest.raises(ValueError, match="x \\(4, 3\\), w \\(2, 5, 6\\)"):
        gm.grouped_matmul(x, w, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="'magic' is not one of"):
        gm.resolve_impl("magic")
    assert gm.resolve_impl("auto") == "tiled"  # the tests run on CPU
