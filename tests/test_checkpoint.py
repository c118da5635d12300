"""sdar_jax.checkpoint.train_state and .integrity: state + grain iterator + config
round trip, keep-last-K, interval, incomplete saves ignored, resharding on restore,
integrity records and the fallback from a damaged step to the newest intact one."""

import glob
import json
import logging
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sdar_jax.checkpoint import integrity, train_state
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
    return train_state.with_shardings(jax.eval_shape(lambda: _state(1)), shardings)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_last_k_and_positions_the_iterator(tmp_path):
    config = {"train": {"steps": 10, "workdir": str(tmp_path)}, "required": ["train.workdir"]}
    data = _iterator()
    with train_state.Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        for step in range(1, 5):
            next(data)
            assert ckpt.save(step, _state(step), data, config)
        expected_next = next(data)  # what a resumed run must read first
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]  # complete steps only, the last two

    fresh = _iterator()
    with train_state.Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        assert ckpt.latest_step() == 4 and ckpt.all_steps() == [3, 4]
        state, step, damaged = ckpt.restore(_abstract(), fresh)
        assert ckpt.restore_config() == config
        older, older_step, _ = ckpt.restore(_abstract(), _iterator(), step=3)
    assert damaged == ()
    assert step == 4 and older_step == 3
    _assert_tree_equal(state, _state(4))
    _assert_tree_equal(older, _state(3))
    np.testing.assert_array_equal(next(fresh), expected_next)


def test_should_save_follows_the_interval(tmp_path):
    with train_state.Checkpointer(tmp_path, save_every=3, keep=1) as ckpt:
        assert [s for s in range(1, 10) if ckpt.should_save(s)] == [3, 6, 9]


def test_incomplete_step_directory_is_ignored(tmp_path):
    with train_state.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        ckpt.save(1, _state(1), _iterator(), {})
    # What a save killed mid-write leaves behind: orbax's temporary directory.
    os.makedirs(tmp_path / "2.orbax-checkpoint-tmp-1234" / "state")
    with train_state.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        assert ckpt.latest_step() == 1
        state, step, _ = ckpt.restore(_abstract(), _iterator())
    assert step == 1
    _assert_tree_equal(state, _state(1))


def test_restore_without_checkpoint_raises(tmp_path):
    with train_state.Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(_abstract(), _iterator())


def test_restore_reshards_onto_the_target_layout(tmp_path):
    with train_state.Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(2, _state(2), _iterator(), {})
    mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, jax.eval_shape(lambda: _state(1)))
    rows = NamedSharding(mesh, PartitionSpec("fsdp", None))
    shardings = shardings.replace(params={"layer": {"kernel": rows}, "norm": {"scale": replicated}})
    with train_state.Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        state = ckpt.restore(_abstract(shardings), _iterator()).state
    kernel = state.params["layer"]["kernel"]
    assert kernel.sharding == rows
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 4)}
    _assert_tree_equal(state, _state(2))


# ---- integrity ----------------------------------------------------------------------------


def _largest_state_file(step_dir):
    """The largest array-data file of the step's state (tensorstore/OCDBT `d/` files)."""
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    return max(files, key=os.path.getsize)


def _flip(path, count=100):
    data = bytearray(open(path, "rb").read())
    start = max(0, len(data) // 2 - count // 2)
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _delete_manifests(step_dir):
    found = glob.glob(os.path.join(step_dir, "state", "**", "manifest.ocdbt"), recursive=True)
    assert found
    for path in found:
        os.remove(path)


def _garbage_data_json(step_dir):
    (path,) = glob.glob(os.path.join(step_dir, "data", "*.json"))
    open(path, "w").write("{not json")


DAMAGE = {
    "flipped_bytes": lambda d: _flip(_largest_state_file(d)),
    "truncated_file": lambda d: _truncate(_largest_state_file(d)),
    "deleted_manifests": _delete_manifests,
    "deleted_state": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "garbage_iterator_json": _garbage_data_json,
    "deleted_integrity_record": lambda d: os.remove(os.path.join(d, integrity.INTEGRITY_FILE)),
}


@pytest.mark.parametrize("async_save", [True, False])
def test_every_step_records_its_files(tmp_path, async_save):
    with train_state.Checkpointer(tmp_path, save_every=1, keep=3, async_save=async_save) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _state(step), _iterator(), {"step": step})
    for step in (1, 2):
        step_dir = str(tmp_path / str(step))
        record = json.load(open(os.path.join(step_dir, integrity.INTEGRITY_FILE)))
        assert record["step"] == step
        assert any(f.startswith("state/") for f in record["files"])
        assert any(f.startswith("data/") for f in record["files"])
        assert integrity.verify_step_files(step_dir) is None


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_step_falls_back_to_the_newest_intact(tmp_path, caplog, damage):
    data = _iterator()
    positions = {}
    with train_state.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        for step in (1, 2, 3):
            next(data)
            ckpt.save(step, _state(step), data, {"step": step})
            positions[step] = data.get_state()
    DAMAGE[damage](str(tmp_path / "3"))

    fresh = _iterator()
    with caplog.at_level(logging.WARNING, logger="sdar_jax.checkpoint"):
        with train_state.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
            state, step, damaged = ckpt.restore(_abstract(), fresh)
            assert ckpt.all_steps() == [1, 2]
            # The resumed run can write step 3 again.
            assert ckpt.save(3, _state(3), fresh, {"step": 3})
    assert step == 2 and [d.step for d in damaged] == [3]
    _assert_tree_equal(state, _state(2))
    assert fresh.get_state() == positions[2]
    damaged_warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(damaged_warnings) == 1 and "step 3" in damaged_warnings[0]
    assert os.path.isdir(tmp_path / "3.damaged")


def test_flipped_bytes_that_orbax_restores_silently_are_caught(tmp_path):
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
    state = _state(1).replace(params={"w": weights})
    with train_state.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        ckpt.save(1, state, _iterator(), {})
    path = _largest_state_file(str(tmp_path / "1"))
    _flip(path)
    # orbax / tensorstore alone: no error, other numbers (why the record exists).
    with ocp.StandardCheckpointer() as reader:
        silent = reader.restore(tmp_path / "1" / "state", jax.eval_shape(lambda: state))
    assert not np.array_equal(np.asarray(silent.params["w"]),
                              np.asarray(weights))
    problem = integrity.verify_step_files(str(tmp_path / "1"))
    assert os.path.relpath(path, tmp_path / "1") in problem and "SHA-256" in problem


def test_non_finite_state_is_not_restored(tmp_path):
    """A step whose files are consistent but whose state holds NaN (written so) is passed over."""
    bad = _state(2)
    bad = bad.replace(params={**bad.params, "norm": {"scale": jnp.full((4,), jnp.nan)}})
    with train_state.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        ckpt.save(1, _state(1), _iterator(), {})
        ckpt.save(2, bad, _iterator(), {})
    with train_state.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        state, step, damaged = ckpt.restore(_abstract(), _iterator())
    assert step == 1 and damaged[0].step == 2 and "['norm']['scale']" in damaged[0].problem
    _assert_tree_equal(state, _state(1))


def test_no_intact_step_raises_listing_each(tmp_path):
    with train_state.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        ckpt.save(1, _state(1), _iterator(), {})
        ckpt.save(2, _state(2), _iterator(), {})
    _truncate(_largest_state_file(str(tmp_path / "2")))
    os.remove(tmp_path / "1" / integrity.INTEGRITY_FILE)
    with train_state.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        with pytest.raises(integrity.CheckpointIntegrityError) as err:
            ckpt.restore(_abstract(), _iterator())
    message = str(err.value)
    assert "step 2:" in message and "truncated" in message
    assert "step 1:" in message and integrity.INTEGRITY_FILE in message
    assert "\n" not in message
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # nothing is moved when nothing is usable


def test_config_check_runs_before_the_state_is_read(tmp_path):
    with train_state.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        ckpt.save(1, _state(1), _iterator(), {"lr": 1})
    seen = []

    def refuse(step, saved):
        seen.append((step, saved))
        raise ValueError("changed")

    with train_state.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        with pytest.raises(ValueError, match="changed"):
            ckpt.restore(_abstract(), _iterator(), check_config=refuse)
    assert seen == [(1, {"lr": 1})]
