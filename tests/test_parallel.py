"""Mesh construction, logical-axis rules and sharded-equals-unsharded training maths.

Runs on the 8 fake CPU devices that tests/conftest.py sets up.
"""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from sdar_jax import parallel
from sdar_jax.config import get_preset
from sdar_jax.model import sharding as model_sharding
from sdar_jax.ops.masks import MaskSpec
from sdar_jax.model import transformer
from sdar_jax.parallel import ParallelConfig, ParallelConfigError, ShardingContext
from sdar_jax.train import config as train_config
from sdar_jax.train import step as step_lib
from sdar_jax.train.state import abstract_train_state, create_train_state

BATCH, SEQ = 8, 16

FS = "fsdp"
TP = "tensor"
EP = "expert"

# Expected PartitionSpecs of the "tiny" model (vocab 512, hidden 64, 4 heads,
# 2 kv heads, head_dim 16, mlp 128), written out by hand from the default rules.
DENSE_DP2_FSDP2_TP2 = {
    "embed_tokens/embedding": P(TP, FS),
    "layers/input_layernorm/scale": P(None, FS),
    "layers/post_attention_layernorm/scale": P(None, FS),
    "layers/self_attn/q_proj/kernel": P(None, FS, TP, None),
    "layers/self_attn/k_proj/kernel": P(None, FS, TP, None),
    "layers/self_attn/v_proj/kernel": P(None, FS, TP, None),
    "layers/self_attn/o_proj/kernel": P(None, TP, None, FS),
    "layers/self_attn/q_norm/scale": P(None, None),
    "layers/self_attn/k_norm/scale": P(None, None),
    "layers/mlp/gate_proj/kernel": P(None, FS, TP),
    "layers/mlp/up_proj/kernel": P(None, FS, TP),
    "layers/mlp/down_proj/kernel": P(None, TP, FS),
    "norm/scale": P(FS),
    "lm_head/kernel": P(FS, TP),
}
DENSE_FSDP8 = {
    "embed_tokens/embedding": P(None, FS),
    "layers/input_layernorm/scale": P(None, FS),
    "layers/post_attention_layernorm/scale": P(None, FS),
    "layers/self_attn/q_proj/kernel": P(None, FS, None, None),
    "layers/self_attn/k_proj/kernel": P(None, FS, None, None),
    "layers/self_attn/v_proj/kernel": P(None, FS, None, None),
    "layers/self_attn/o_proj/kernel": P(None, None, None, FS),
    "layers/self_attn/q_norm/scale": P(None, None),
    "layers/self_attn/k_norm/scale": P(None, None),
    "layers/mlp/gate_proj/kernel": P(None, FS, None),
    "layers/mlp/up_proj/kernel": P(None, FS, None),
    "layers/mlp/down_proj/kernel": P(None, None, FS),
    "norm/scale": P(FS),
    "lm_head/kernel": P(FS, None),
}
DENSE_DATA8 = {name: P(*(None,) * len(spec)) for name, spec in DENSE_FSDP8.items()}
# "tiny-moe" (8 experts, moe mlp 32, no q/k-norm difference) on fsdp 2 x tensor 2 x expert 2:
# `embed` takes (fsdp, expert) except where `expert` already shards the expert dimension.
MOE_FSDP2_TP2_EP2 = {
    "embed_tokens/embedding": P(TP, (FS, EP)),
    "layers/input_layernorm/scale": P(None, (FS, EP)),
    "layers/post_attention_layernorm/scale": P(None, (FS, EP)),
    "layers/self_attn/q_proj/kernel": P(None, (FS, EP), TP, None),
    "layers/self_attn/k_proj/kernel": P(None, (FS, EP), TP, None),
    "layers/self_attn/v_proj/kernel": P(None, (FS, EP), TP, None),
    "layers/self_attn/o_proj/kernel": P(None, TP, None, (FS, EP)),
    "layers/self_attn/q_norm/scale": P(None, None),
    "layers/self_attn/k_norm/scale": P(None, None),
    "layers/mlp/router/kernel": P(None, (FS, EP), None),
    "layers/mlp/gate_proj/kernel": P(None, EP, FS, TP),
    "layers/mlp/up_proj/kernel": P(None, EP, FS, TP),
    "layers/mlp/down_proj/kernel": P(None, EP, TP, FS),
    "norm/scale": P((FS, EP)),
    "lm_head/kernel": P((FS, EP), TP),
}

# A layout unlike the defaults in every consumer: the batch axes in another order (batches,
# cache, layer-boundary constraint, attention kernels, MoE tokens), embed over tensor, mlp over
# fsdp, vocab and kv heads replicated.
CUSTOM_RULES = (
    ("batch", ("expert", "fsdp", "data")),
    ("length", None),
    ("layers", None),
    ("vocab", None),
    ("embed", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", None),
    ("head_dim", None),
    ("mlp", "fsdp"),
    ("expert", "expert"),
    ("norm", None),
)
CUSTOM_DENSE = dict(data=2, fsdp=2, tensor=2)
CUSTOM_MOE = dict(data=2, tensor=2, expert=2)

CASES = [
    pytest.param("tiny", ParallelConfig(data=8), DENSE_DATA8, id="data8"),
    pytest.param("tiny", ParallelConfig(data=1, fsdp=8), DENSE_FSDP8, id="fsdp8"),
    pytest.param("tiny", ParallelConfig(data=2, fsdp=2, tensor=2), DENSE_DP2_FSDP2_TP2, id="dp2-fsdp2-tp2"),
    pytest.param(
        "tiny-moe", ParallelConfig(data=1, fsdp=2, tensor=2, expert=2), MOE_FSDP2_TP2_EP2,
        id="moe-fsdp2-tp2-ep2",
    ),
]


def _by_name(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]
    return {"/".join(k.key for k in path): leaf for path, leaf in flat}


def _context(pconfig: ParallelConfig, devices=None) -> ShardingContext:
    return ShardingContext.from_config(pconfig, devices)


def _batch(config, batch: int = BATCH, seq: int = SEQ) -> dict[str, np.ndarray]:
    """Rows packing an 8-token and a 4-token example (first block a prompt), then 4 padding tokens."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, config.vocab_size - 1, (batch, seq), dtype=np.int32)
    lengths = (8, 4, seq - 12)
    segment_ids = np.repeat(np.array([1, 2, 0], np.int32), lengths)[None].repeat(batch, 0)
    positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])[None].repeat(batch, 0)
    loss_mask = (segment_ids > 0) & (positions >= 4)
    return dict(tokens=tokens, positions=positions, segment_ids=segment_ids, loss_mask=loss_mask)


# ---------------------------------------------------------------------------
# Mesh and config


def test_mesh_resolves_minus_one_and_uses_auto_axes():
    mesh = parallel.make_mesh(ParallelConfig(data=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1}
    assert mesh.axis_names == parallel.MESH_AXES
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(data=3, fsdp=1), "has 3 devices but 8 are available"),
        (dict(data=-1, fsdp=3), "do not divide|does not divide"),
    ],
)
def test_mesh_rejects_wrong_device_count(kwargs, message):
    with pytest.raises(ParallelConfigError, match=message):
        parallel.make_mesh(ParallelConfig(**kwargs))


def test_config_validation_names_the_field():
    with pytest.raises(ParallelConfigError, match="at most one mesh axis may be -1"):
        ParallelConfig(data=-1, fsdp=-1)
    with pytest.raises(ParallelConfigError, match="ParallelConfig.tensor"):
        ParallelConfig(tensor=0)
    with pytest.raises(ParallelConfigError, match="mesh axis 'model'"):
        ParallelConfig(logical_rules=(("embed", "model"),))
    with pytest.raises(ParallelConfigError, match="'embed' has two rules"):
        ParallelConfig(logical_rules=(("embed", "fsdp"), ("embed", None)))
    with pytest.raises(ParallelConfigError, match="unknown fields \\['pipeline'\\]"):
        ParallelConfig.from_mapping({"data": 2, "pipeline": 2})


def test_from_mapping_reads_the_run_config_mesh_section():
    rules = [["batch", ["data", "fsdp"]], ["embed", "fsdp"]]
    config = ParallelConfig.from_mapping(dict(data=2, fsdp=4, tensor=1, expert=1, logical_rules=rules))
    assert config.rules == {"batch": ("data", "fsdp"), "embed": "fsdp"}
    default = ParallelConfig.from_mapping(dict(data=-1, fsdp=1, tensor=1, expert=1, logical_rules=None))
    assert default.logical_rules == parallel.DEFAULT_LOGICAL_AXIS_RULES


def test_unknown_logical_name_is_an_error():
    rules = dict(parallel.DEFAULT_LOGICAL_AXIS_RULES)
    del rules["mlp"]
    context = _context(ParallelConfig(logical_rules=tuple(rules.items())))
    message = "param layers/mlp/down_proj/kernel: logical axis 'mlp' has no rule"
    with pytest.raises(ParallelConfigError, match=message):
        model_sharding.param_specs(get_preset("tiny"), context)


# ---------------------------------------------------------------------------
# Rules -> PartitionSpecs


@pytest.mark.parametrize("preset, pconfig, expected", CASES)
def test_param_specs_follow_the_rules(preset, pconfig, expected):
    specs = _by_name(model_sharding.param_specs(get_preset(preset), _context(pconfig)))
    assert specs == expected


def test_indivisible_dimension_falls_back_to_replication(caplog):
    # tensor 8: heads (4) and kv_heads (2) do not divide; vocab 512 and mlp 128 do.
    context = _context(ParallelConfig(data=1, tensor=8))
    with caplog.at_level(logging.WARNING, logger="sdar_jax.parallel"):
        specs = _by_name(model_sharding.param_specs(get_preset("tiny"), context))
    assert specs["layers/self_attn/q_proj/kernel"] == P(None, None, None, None)
    assert specs["layers/self_attn/k_proj/kernel"] == P(None, None, None, None)
    assert specs["layers/mlp/up_proj/kernel"] == P(None, None, TP)
    assert specs["lm_head/kernel"] == P(None, TP)
    assert "layers/self_attn/q_proj/kernel: dimension 'heads' of size 4" in caplog.text


@pytest.mark.parametrize(
    "preset, sizes, gate_spec",
    [
        ("sdar-1.7b", dict(data=1, fsdp=64), P(None, FS, None)),
        ("sdar-8b", dict(data=2, fsdp=16, tensor=4), P(None, FS, TP)),
        ("sdar-30b-a3b", dict(data=1, fsdp=8, expert=8), P(None, EP, FS, None)),
        ("sdar-30b-a3b", dict(data=1, fsdp=4, tensor=4, expert=16), P(None, EP, FS, TP)),
    ],
)
def test_released_models_shard_without_fallback(preset, sizes, gate_spec, caplog):
    """The default rules divide every dimension of the released SDAR models on pod-sized meshes."""
    shape = {axis: sizes.get(axis, 1) for axis in parallel.MESH_AXES}
    mesh = jax.sharding.AbstractMesh(
        tuple(shape.values()), parallel.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4
    )
    with caplog.at_level(logging.WARNING, logger="sdar_jax.parallel"):
        specs = model_sharding.param_specs(get_preset(preset), ShardingContext(mesh))
    assert caplog.text == ""
    assert specs["layers"]["mlp"]["gate_proj"]["kernel"] == gate_spec


def test_partial_fallback_keeps_the_dividing_prefix():
    # batch 4 over (data 2, fsdp 4): only `data` divides; strict raises.
    mesh_shape = {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
    rules = dict(parallel.DEFAULT_LOGICAL_AXIS_RULES)
    spec = parallel.logical_to_mesh_spec(("batch", None), (4, 3), rules, mesh_shape)
    assert spec == P("data", None)
    with pytest.raises(ParallelConfigError, match="dimension 'batch' of size 4 is not divisible"):
        parallel.logical_to_mesh_spec(("batch", None), (4, 3), rules, mesh_shape, strict=True)


def test_batch_shardings_require_divisible_batch():
    context = _context(ParallelConfig(data=8))
    batch = _batch(get_preset("tiny"), batch=8)
    shardings = context.batch_shardings(batch)
    assert {s.spec for s in shardings.values()} == {P("data", None)}
    message = "batch loss_mask: dimension 'batch' of size 4 is not divisible by mesh axes \\('data',\\)"
    with pytest.raises(ParallelConfigError, match=message):
        context.batch_shardings(_batch(get_preset("tiny"), batch=4))


def test_cache_shardings():
    config = get_preset("tiny")
    context = _context(ParallelConfig(data=2, fsdp=2, tensor=2))
    cache = jax.eval_shape(lambda: transformer.init_cache(config, 4, 32))
    shardings = context.cache_shardings(cache)
    assert shardings.k.spec == P(None, ("data", "fsdp"), None, TP, None)
    one_row = jax.eval_shape(lambda: transformer.init_cache(config, 1, 32))
    assert context.cache_shardings(one_row).v.spec == P(None, None, None, TP, None)


def test_state_shardings_cover_optimizer_moments():
    config = get_preset("tiny")
    context = _context(ParallelConfig(data=2, fsdp=2, tensor=2))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    params = model_sharding.param_shapes(config)
    state = jax.eval_shape(
        lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}, params
    )
    shardings = model_sharding.state_shardings(state, config, context)
    adam = shardings["opt_state"][1][0]
    expected = DENSE_DP2_FSDP2_TP2
    assert _by_name(jax.tree.map(lambda s: s.spec, shardings["params"])) == expected
    assert _by_name(jax.tree.map(lambda s: s.spec, adam.mu)) == expected
    assert _by_name(jax.tree.map(lambda s: s.spec, adam.nu)) == expected
    assert adam.count.spec == P()
    assert shardings["step"].spec == P()


def test_process_batch_slice_single_process_owns_all_rows():
    pconfig = ParallelConfig(data=8)
    mesh = parallel.make_mesh(pconfig)
    sharding = jax.sharding.NamedSharding(mesh, P("data"))
    assert parallel.process_batch_slice(sharding, 16) == slice(0, 16)
    local = {"tokens": np.arange(32, dtype=np.int32).reshape(16, 2)}
    arrays = parallel.shard_batch(local, {"tokens": sharding}, 16)
    np.testing.assert_array_equal(np.asarray(arrays["tokens"]), local["tokens"])
    assert arrays["tokens"].sharding == sharding


# ---------------------------------------------------------------------------
# Sharded equals unsharded: the trainer's train step (SDAR objective, MoE aux
# loss included) with optax.scale(-1), so that new params = params - grads.


def _run_config(preset: str):
    config = train_config.base_config()
    config.model.preset = preset
    config.data.seq_len = SEQ
    config.data.global_batch_size = BATCH
    return config


def _one_step(preset: str, pconfig: ParallelConfig, initial, devices=None):
    """(metrics, grads, new-state shardings) of one train step on the mesh `pconfig`, from the
    host-memory TrainState `initial` placed into the rule-derived state shardings."""
    config = _run_config(preset)
    model = train_config.model_config(config)
    tx = optax.scale(-1.0)
    context = _context(pconfig, devices)
    state_sh = model_sharding.state_shardings(abstract_train_state(model, tx), model, context)
    batch = _batch(model)
    batch_sh = context.batch_shardings(batch)
    train_step = step_lib.compile_train_step(
        config, model, tx, optax.constant_schedule(1.0), state_shardings=state_sh, batch_shardings=batch_sh
    )
    with context.activate():
        new_state, metrics = train_step(jax.device_put(initial, state_sh), jax.device_put(batch, batch_sh))
    grads = jax.tree.map(lambda p, q: p - np.asarray(q), initial.params, new_state.params)
    specs = jax.tree.map(lambda x: x.sharding.spec, new_state.params)
    return jax.device_get(metrics), grads, specs


@pytest.fixture(scope="module")
def initial_states():
    """Each model's initial TrainState in host memory, made once and placed on every mesh.

    Initialising under each mesh instead (jit with the state shardings as out_shardings) cost
    one more compile per case, a third of its time; the trainer's sharded initialisation is
    checked against one device by tests/test_multiprocess.py::test_two_processes_train_like_one.
    """
    out = {}
    for preset in ("tiny", "tiny-moe"):
        model = train_config.model_config(_run_config(preset))
        init = jax.jit(lambda r: create_train_state(model, optax.scale(-1.0), r))  # noqa: B023
        out[preset] = jax.device_get(init(jax.random.key(0)))
    return out


@pytest.fixture(scope="module")
def references(initial_states):
    """One train step of each model on a single device."""
    single = ParallelConfig(data=1)
    return {preset: _one_step(preset, single, initial_states[preset], jax.devices()[:1])
            for preset in ("tiny", "tiny-moe")}


def test_sharded_moe_init_equals_the_one_device_init(initial_states):
    """The train state initialised straight into its shardings on an expert mesh holds the
    one-device values (the dense model's sharded init is checked by test_multiprocess)."""
    model = train_config.model_config(_run_config("tiny-moe"))
    tx = optax.scale(-1.0)
    context = _context(ParallelConfig(data=1, fsdp=2, tensor=2, expert=2))
    state_sh = model_sharding.state_shardings(abstract_train_state(model, tx), model, context)
    with context.activate():
        state = jax.jit(lambda r: create_train_state(model, tx, r), out_shardings=state_sh)(jax.random.key(0))
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), initial_states["tiny-moe"])


@pytest.mark.parametrize("preset, pconfig, expected", CASES)
def test_sharded_train_step_equals_single_device(references, initial_states, preset, pconfig, expected):
    ref_metrics, ref_grads, _ = references[preset]
    metrics, grads, specs = _one_step(preset, pconfig, initial_states[preset])
    assert float(ref_metrics["loss"]) > 0 and float(ref_metrics["grad_norm"]) > 0
    if preset == "tiny-moe":
        assert float(ref_metrics["aux_loss"]) > 0
    for key in ("loss", "aux_loss", "grad_norm", "accuracy", "num_loss_tokens"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    # grads = params - new params: exact up to one float32 ulp of the norm scales (~1), 1.2e-7.
    for (path, g), ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=3e-7, err_msg=jax.tree_util.keystr(path))
    assert _by_name(specs) == expected


# ---------------------------------------------------------------------------
# Decoding on a mesh


def test_constrain_cache_pins_the_cache_under_a_mesh():
    config = get_preset("tiny")
    pconfig = ParallelConfig(data=2, fsdp=2, tensor=2)
    mesh = parallel.make_mesh(pconfig)
    make = jax.jit(lambda: parallel.constrain_cache(transformer.init_cache(config, 4, 32)))
    with jax.set_mesh(mesh):
        cache = make()
    expected = jax.sharding.NamedSharding(mesh, P(None, ("data", "fsdp"), None, TP, None))
    assert cache.k.sharding.is_equivalent_to(expected, 5)
    assert cache.v.sharding.is_equivalent_to(expected, 5)
    assert len(make().k.sharding.device_set) == 1  # no mesh: left alone


@pytest.mark.parametrize("rules", [None, CUSTOM_RULES], ids=["default-rules", "custom-rules"])
def test_sharded_decoding_equals_single_device(rules):
    from sdar_jax.decode.decoder import DecodeConfig, generate

    config = get_preset("tiny")
    params = jax.jit(transformer.init_params, static_argnums=0)(config, jax.random.key(3))  # eager: op by op
    prompts = np.random.default_rng(1).integers(2, config.vocab_size - 1, (4, 6)).astype(np.int32)
    lengths = np.array([6, 3, 5, 1], np.int32)
    decode = DecodeConfig(block_length=4, steps=2, max_new_tokens=8, strategy="low_confidence_static")
    want = generate(params, config, prompts, lengths, jax.random.key(0), decode)

    context = _context(ParallelConfig(**CUSTOM_DENSE, **({} if rules is None else {"logical_rules": rules})))
    sharded = jax.device_put(params, model_sharding.param_shardings(config, context))
    with context.activate():
        got = generate(sharded, config, prompts, lengths, jax.random.key(0), decode)
        # The cache the decoder pins follows the active rules.
        cache = jax.jit(lambda: parallel.constrain_cache(transformer.init_cache(config, 4, 32)))()
    batch_axes = ("fsdp", "data") if rules else ("data", "fsdp")
    expected = jax.sharding.NamedSharding(context.mesh, P(None, batch_axes, None, None if rules else TP, None))
    assert cache.k.sharding.is_equivalent_to(expected, 5), cache.k.sharding.spec
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.num_forwards), np.asarray(want.num_forwards))


def test_fsdp_runs_each_matmul_on_the_devices_own_rows():
    """fsdp 8: the layer-boundary activation constraint keeps tokens sharded (weights are
    gathered instead), so no 2-D matmul sees all BATCH * 2 * SEQ tokens of the SDAR rows."""
    config = _run_config("tiny")
    model = train_config.model_config(config)
    tx = optax.scale(-1.0)
    context = _context(ParallelConfig(data=1, fsdp=8))
    abstract = abstract_train_state(model, tx)
    state_sh = model_sharding.state_shardings(abstract, model, context)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(model))
    batch_sh = context.batch_shardings(batch)
    train_step = step_lib.compile_train_step(
        config, model, tx, optax.constant_schedule(1.0), state_shardings=state_sh, batch_shardings=batch_sh
    )
    with context.activate():
        hlo = train_step.lower(abstract, batch).compile().as_text()
    rows = [int(n) for n in re.findall(r"f32\[(\d+),\d+\]\{1,0\} dot\(", hlo)]
    local_tokens = BATCH * 2 * SEQ // 8
    assert local_tokens in rows
    assert BATCH * 2 * SEQ not in rows, sorted(set(rows))


# ---------------------------------------------------------------------------
# One sharding context: a custom rule set reaches every consumer


@pytest.mark.parametrize(
    "preset, sizes", [("tiny", CUSTOM_DENSE), ("tiny-moe", CUSTOM_MOE)], ids=["dense", "moe"]
)
def test_custom_rules_train_like_the_defaults_with_their_own_specs(references, initial_states, preset, sizes):
    """Params, optimizer state, batches, the layer constraint and (MoE) expert parallelism
    under the custom rules: the train step equals one device, and the applied specs are the
    custom ones, not the defaults."""
    custom = ParallelConfig(**sizes, logical_rules=CUSTOM_RULES)
    ref_metrics, ref_grads, _ = references[preset]
    metrics, grads, specs = _one_step(preset, custom, initial_states[preset])
    for key in ("loss", "aux_loss", "grad_norm", "accuracy"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    for (path, g), ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=3e-7, err_msg=jax.tree_util.keystr(path))
    model = get_preset(preset)
    want = _by_name(model_sharding.param_specs(model, _context(custom)))
    default = _by_name(model_sharding.param_specs(model, _context(ParallelConfig(**sizes))))
    assert _by_name(specs) == want
    assert want["layers/self_attn/q_proj/kernel"] == P(None, TP, None, None)
    assert default["layers/self_attn/q_proj/kernel"] != want["layers/self_attn/q_proj/kernel"]


def _traced(context: ShardingContext, fn, *args) -> str:
    # The rules are read at trace time and are not part of jit's cache key (parallel.py's
    # docstring: a jitted function keeps the trace of the first context it ran under), so an
    # inner function traced earlier in this process under other rules must not be reused.
    jax.clear_caches()
    with context.activate():
        return str(jax.make_jaxpr(fn)(*args))


def test_custom_rules_reach_the_constraints_inside_the_model():
    config = get_preset("tiny-moe")
    params = model_sharding.param_shapes(config)
    tokens = jnp.zeros((8, 4), jnp.int32)
    apply = lambda p, t: transformer.apply(config, p, t, t, mask=MaskSpec("causal")).logits  # noqa: E731
    custom = _traced(_context(ParallelConfig(**CUSTOM_MOE, logical_rules=CUSTOM_RULES)), apply, params, tokens)
    default = _traced(_context(ParallelConfig(**CUSTOM_MOE)), apply, params, tokens)
    # Layer boundary [batch, seq, hidden]: batch over the custom order.
    assert "spec=P(('expert', 'data'), None, None)" in custom
    assert "spec=P(('data', 'expert'), None, None)" in default
    # Expert parallelism: tokens over (expert, data), mlp unsplit (custom: mlp -> fsdp, size 1)
    # instead of tokens over (data, expert) and mlp over tensor.
    assert "in_specs=(P(('expert', 'data'),), P(('expert', 'data'),), P(('expert', 'data'),), " \
           "P('expert', None, None)" in custom
    assert "in_specs=(P(('data', 'expert'),), P(('data', 'expert'),), P(('data', 'expert'),), " \
           "P('expert', None, 'tensor')" in default


def test_custom_rules_reach_the_pallas_shard_map():
    """The Pallas attention kernels run per device with the context's batch/heads specs and
    give the reference result under either rule set."""
    from sdar_jax.ops.attention import attention
    from sdar_jax.ops.masks import AttentionMask
    from sdar_jax.ops.xla_attention import xla_attention

    q, k, v = (jax.random.normal(key, (8, 16, heads, 16)) for key, heads in
               zip(jax.random.split(jax.random.key(0), 3), (4, 2, 2)))
    positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (8, 16))
    mask = AttentionMask.self_attention(MaskSpec("causal"), positions)
    want = xla_attention(q, k, v, mask)
    for rules, batch_axes in ((CUSTOM_RULES, ("fsdp", "data")), (None, ("data", "fsdp"))):
        # A fresh jit per context: a jitted function keeps the trace of its first context.
        fn = jax.jit(lambda q, k, v: attention(q, k, v, mask, impl="pallas", backend="gpu", interpret=True))
        extra = {} if rules is None else {"logical_rules": rules}
        context = _context(ParallelConfig(**CUSTOM_DENSE, **extra))
        assert f"in_specs=(P({batch_axes!r}, None, 'tensor', None)," in _traced(context, fn, q, k, v)
        with context.activate():
            got = fn(q, k, v)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_context_is_scoped_to_its_block():
    context = _context(ParallelConfig(**CUSTOM_DENSE, logical_rules=CUSTOM_RULES))
    assert parallel.current_context() is None
    with context.activate():
        assert parallel.current_context().logical_rules == CUSTOM_RULES
        with jax.set_mesh(context.mesh):  # a bare mesh inside keeps the run's rules
            assert parallel.current_context().rules["batch"] == ("expert", "fsdp", "data")
    assert parallel.current_context() is None
    with jax.set_mesh(context.mesh):  # a bare mesh alone: the default rules
        assert parallel.current_context().logical_rules == parallel.DEFAULT_LOGICAL_AXIS_RULES


def test_parallel_does_not_import_the_model():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(parallel))
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m and m.startswith("sdar_jax")}, imported


def test_process_layout_check_names_the_mesh():
    context = _context(ParallelConfig(data=1, tensor=8))
    sharding = context.batch_shardings({"tokens": jax.ShapeDtypeStruct((8, 4), jnp.int32)})["tokens"]
    assert parallel.check_process_layout(sharding, 8) == slice(0, 8)
    # As process 1 of 2, the pipeline would feed rows [4, 8) but every device holds all rows.
    message = (r"process 1 of 2: the data pipeline gives it batch rows \[4, 8\) but its devices hold "
               r"rows \[0, 8\) on mesh data=1,fsdp=1,tensor=8,expert=1, whose batch axes \(\) make 1 shard")
    with pytest.raises(ParallelConfigError, match=message):
        parallel.check_process_layout(sharding, 8, process_index=1, process_count=2)
    with pytest.raises(ParallelConfigError, match="global batch 7 is not divisible by the 2 processes"):
        parallel.check_process_layout(sharding, 7, process_index=0, process_count=2)
