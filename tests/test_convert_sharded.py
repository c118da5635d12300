"""jax-to-hf from a params checkpoint saved from sharded arrays (8 fake CPU devices): the export
reads the stored regions, whatever the layout the shards were written in, and equals the params."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sdar_jax import parallel
from sdar_jax.checkpoint.params import save_params_checkpoint
from sdar_jax.convert.from_hf import hf_to_params
from sdar_jax.convert.safetensors_io import find_safetensors
from sdar_jax.convert.to_hf import jax_to_hf
from sdar_jax.config import get_preset
from sdar_jax.model import sharding as model_sharding


@pytest.mark.parametrize("preset, mesh", [("tiny", "fsdp=4,tensor=2"), ("tiny-moe", "data=2,tensor=2,expert=2")])
def test_export_of_a_sharded_save_equals_the_params(tmp_path, preset, mesh):
    config = get_preset(preset)
    rng = np.random.default_rng(5)
    host = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), model_sharding.param_shapes(config))
    context = parallel.ShardingContext.from_config(parallel.parse_mesh_spec(mesh))
    sharded = jax.device_put(host, model_sharding.param_shardings(config, context))
    q = sharded["layers"]["self_attn"]["q_proj"]["kernel"]
    assert len({str(s.index) for s in q.addressable_shards}) > 1  # really saved from several shards
    save_params_checkpoint(tmp_path / "ckpt", config, sharded)

    jax_to_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_bytes=200_000)
    assert len(set(find_safetensors(tmp_path / "hf").values())) > 1  # written shard by shard
    back_config, back = hf_to_params(tmp_path / "hf")
    assert back_config.num_experts == config.num_experts
    flat_back = jax.tree_util.tree_flatten_with_path(back)[0]
    flat_host = jax.tree.leaves(host)
    assert len(flat_back) == len(flat_host)
    for (path, got), want in zip(flat_back, flat_host):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
