"""sdar_jax.checkpoint: state + grain iterator + config round trip, keep-last-K,
interval, incomplete saves ignored, resharding on restore."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sdar_jax import checkpoint
from sdar_jax.train.state import TrainState


def _state(step: int) -> TrainState:
    params = {"layer": {"kernel": jnp.arange(32, dtype=jnp.float32).reshape(8, 4) * step},
              "norm": {"scale": jnp.ones((4,), jnp.float32)}}
    tx = optax.adamw(1e-3)
    return TrainState(
        step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(step)),
    )


def _iterator():
    return iter(grain.MapDataset.range(1000).shuffle(seed=3).batch(4).to_iter_dataset())


def _abstract(shardings=None):
    return checkpoint.with_shardings(jax.eval_shape(lambda: _state(1)), shardings)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_last_k_and_positions_the_iterator(tmp_path):
    config = {"train": {"steps": 10, "workdir": str(tmp_path)}, "required": ["train.workdir"]}
    data = _iterator()
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        for step in range(1, 5):
            next(data)
            assert ckpt.save(step, _state(step), data, config)
        expected_next = next(data)  # what a resumed run must read first
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]  # complete steps only, the last two

    fresh = _iterator()
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        assert ckpt.latest_step() == 4 and ckpt.all_steps() == [3, 4]
        state, step = ckpt.restore(_abstract(), fresh)
        assert ckpt.restore_config() == config
        older, older_step = ckpt.restore(_abstract(), _iterator(), step=3)
    assert step == 4 and older_step == 3
    _assert_tree_equal(state, _state(4))
    _assert_tree_equal(older, _state(3))
    np.testing.assert_array_equal(next(fresh), expected_next)


def test_should_save_follows_the_interval(tmp_path):
    with checkpoint.Checkpointer(tmp_path, save_every=3, keep=1) as ckpt:
        assert [s for s in range(1, 10) if ckpt.should_save(s)] == [3, 6, 9]


def test_incomplete_step_directory_is_ignored(tmp_path):
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        ckpt.save(1, _state(1), _iterator(), {})
    # What a save killed mid-write leaves behind: orbax's temporary directory.
    os.makedirs(tmp_path / "2.orbax-checkpoint-tmp-1234" / "state")
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        assert ckpt.latest_step() == 1
        state, step = ckpt.restore(_abstract(), _iterator())
    assert step == 1
    _assert_tree_equal(state, _state(1))


def test_restore_without_checkpoint_raises(tmp_path):
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(_abstract(), _iterator())


def test_restore_reshards_onto_the_target_layout(tmp_path):
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(2, _state(2), _iterator(), {})
    mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, jax.eval_shape(lambda: _state(1)))
    rows = NamedSharding(mesh, PartitionSpec("fsdp", None))
    shardings = shardings.replace(params={"layer": {"kernel": rows}, "norm": {"scale": replicated}})
    with checkpoint.Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        state, _ = ckpt.restore(_abstract(shardings), _iterator())
    kernel = state.params["layer"]["kernel"]
    assert kernel.sharding == rows
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 4)}
    _assert_tree_equal(state, _state(2))
