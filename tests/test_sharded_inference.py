"""Sharded inference on 8 fake CPU devices: `--mesh` parsing, params restored straight into
their shardings, and block-diffusion decoding under the sharding context equal to one device
for every strategy.

Compilation is nearly all of this file's time: one decoder program per mesh for the four
strategies that share a compilation, one each for the staged `said` and `said_chlg` (the
single-device reference is computed once per checkpoint).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sdar_jax import parallel
from sdar_jax.checkpoint.params import save_params_checkpoint
from sdar_jax.checkpoint.sharded_restore import RestoreError, restore_params, setup_inference, to_host
from sdar_jax.config import get_preset
from sdar_jax.decode import strategies
from sdar_jax.decode.decoder import DecodeConfig, generate
from sdar_jax.model import sharding as model_sharding
from sdar_jax.model import transformer
from sdar_jax.parallel import ParallelConfig, ParallelConfigError

# One decode config per strategy (the staged SAID ones need their own budgets).
DECODES = {
    name: DecodeConfig(block_length=4, steps=2, max_new_tokens=8, strategy=name, threshold=0.2)
    for name in strategies.STRATEGIES
}
DECODES["said"] = DecodeConfig(block_length=8, steps=4, max_new_tokens=8, strategy="said", said_stages=2)
DECODES["said_chlg"] = DecodeConfig(
    block_length=4, steps=4, max_new_tokens=8, strategy="said_chlg", said_stages=2, chlg_extra_steps=1,
    chlg_threshold=0.5,
)

MESHES = [
    pytest.param("tiny", "fsdp=4,tensor=2", id="dense-fsdp4-tensor2"),
    pytest.param("tiny", "data=2,tensor=4", id="dense-data2-tensor4"),
    pytest.param("tiny-moe", "data=2,tensor=2,expert=2", id="moe-data2-tensor2-expert2"),
]


def test_every_strategy_has_a_decode_config():
    assert set(DECODES) == set(strategies.STRATEGY_NAMES)


@pytest.mark.parametrize(
    "text, sizes",
    [
        ("fsdp=4,tensor=2", dict(data=-1, fsdp=4, tensor=2, expert=1)),
        ("data=2, tensor=4", dict(data=2, fsdp=1, tensor=4, expert=1)),
        ("fsdp=-1,tensor=2", dict(data=1, fsdp=-1, tensor=2, expert=1)),
        ("data=2,tensor=2,expert=2", dict(data=2, fsdp=1, tensor=2, expert=2)),
    ],
)
def test_parse_mesh_spec(text, sizes):
    config = parallel.parse_mesh_spec(text)
    assert config.axis_sizes == sizes
    assert config.logical_rules == parallel.DEFAULT_LOGICAL_AXIS_RULES


@pytest.mark.parametrize(
    "text, message",
    [
        ("fsdp4", "'fsdp4' is not axis=size"),
        ("model=2", "unknown mesh axis 'model'"),
        ("fsdp=2,fsdp=4", "axis 'fsdp' is given twice"),
        ("tensor=two", "size 'two' of 'tensor' is not an integer"),
        ("tensor=0", "size of 'tensor' must be a positive integer or -1"),
        ("data=-1,fsdp=-1", "at most one axis may be -1"),
    ],
)
def test_parse_mesh_spec_errors_are_one_line(text, message):
    with pytest.raises(ParallelConfigError, match=message) as info:
        parallel.parse_mesh_spec(text)
    assert "\n" not in str(info.value) and f"--mesh {text!r}" in str(info.value)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A random tiny dense and a tiny MoE params checkpoint, with their params in host memory."""
    out = {}
    for i, preset in enumerate(("tiny", "tiny-moe")):
        config = get_preset(preset)
        # Under jit: eagerly, init_params' forward was dispatched op by op.
        init = jax.jit(transformer.init_params, static_argnums=0)
        params = jax.device_get(init(config, jax.random.key(10 + i)))
        path = tmp_path_factory.mktemp("ckpt") / preset
        save_params_checkpoint(path, config, params)
        out[preset] = (str(path), params)
    return out


def _prompts(vocab_size: int):
    prompts = np.random.default_rng(1).integers(2, vocab_size - 1, (4, 6)).astype(np.int32)
    return prompts, np.array([6, 3, 5, 1], np.int32)


@pytest.fixture(scope="module")
def single_device(checkpoints):
    """Every strategy's result on one device (no mesh), per checkpoint."""
    out = {}
    for preset, (path, _) in checkpoints.items():
        setup = setup_inference(path, "data=1", devices=jax.devices()[:1])
        prompts, lengths = _prompts(setup.config.vocab_size)
        out[preset] = {
            name: jax.device_get(generate(setup.params, setup.config, prompts, lengths, jax.random.key(0), dc))
            for name, dc in DECODES.items()
        }
    return out


@pytest.mark.parametrize("preset, mesh", MESHES)
def test_sharded_decoding_equals_one_device(checkpoints, single_device, preset, mesh):
    path, host_params = checkpoints[preset]
    setup = setup_inference(path, mesh)
    assert setup.context.describe() == parallel.describe_mesh(
        parallel.resolve_mesh_shape(parallel.parse_mesh_spec(mesh), 8)
    )
    # Restored straight into the rule-derived shardings: every device holds only its slice.
    want = model_sharding.param_shardings(setup.config, setup.context)
    for (path_, leaf), sharding, host in zip(
        jax.tree_util.tree_flatten_with_path(setup.params)[0], jax.tree.leaves(want), jax.tree.leaves(host_params)
    ):
        name = jax.tree_util.keystr(path_)
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), name
        shard_shape = sharding.shard_shape(leaf.shape)
        assert all(s.data.shape == shard_shape for s in leaf.addressable_shards), name
        np.testing.assert_array_equal(np.asarray(leaf), host, err_msg=name)
    q_spec = setup.params["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec
    assert "tensor" in jax.tree.leaves(tuple(q_spec))

    prompts, lengths = _prompts(setup.config.vocab_size)
    with setup.context.activate():
        for name, dc in DECODES.items():
            got = to_host(generate(setup.params, setup.config, prompts, lengths, jax.random.key(0), dc))
            want_result = single_device[preset][name]
            np.testing.assert_array_equal(np.asarray(got.tokens), want_result.tokens, err_msg=name)
            np.testing.assert_array_equal(np.asarray(got.num_forwards), want_result.num_forwards, err_msg=name)
            np.testing.assert_array_equal(
                np.asarray(got.steps_per_block), want_result.steps_per_block, err_msg=name
            )


def test_restore_reports_every_mismatch(checkpoints):
    path, _ = checkpoints["tiny"]
    context = parallel.ShardingContext.from_config(ParallelConfig(data=8))
    other = get_preset("tiny", num_layers=2, vocab_size=256, mask_token_id=255)
    with pytest.raises(RestoreError, match="stored shape \\[3, 64, 128\\], expected \\[2, 64, 128\\]") as info:
        restore_params(path, model_sharding.param_shardings(other, context), model_sharding.param_shapes(other))
    assert "embed_tokens/embedding: stored shape [512, 64], expected [256, 64]" in str(info.value)


def test_restore_casts_while_reading(checkpoints):
    path, host = checkpoints["tiny"]
    setup = setup_inference(path, "fsdp=8", dtype="bfloat16")
    assert setup.config.param_dtype == "bfloat16"
    kernel = setup.params["lm_head"]["kernel"]
    assert kernel.dtype == jax.numpy.bfloat16 and kernel.sharding.spec == P("fsdp", None)
    np.testing.assert_array_equal(
        np.asarray(kernel), np.asarray(host["lm_head"]["kernel"]).astype(jax.numpy.bfloat16)
    )
