"""The jitted train step: exact gradient accumulation, the reported loss, bf16
compute over float32 master weights, and a falling loss on a learnable task."""

import functools

import jax
import numpy as np
import pytest
from train_synthetic import synthetic_iterator, tiny_config

from sdar_jax.diffusion.loss import sdar_loss
from sdar_jax.model import transformer
from sdar_jax.train import config as run_config
from sdar_jax.train import optimizer, step
from sdar_jax.train.state import create_train_state, step_rng


def _setup(config):
    model = run_config.model_config(config)
    run_config.validate(config, model)
    schedule = optimizer.learning_rate_schedule(config.optimizer, config.train.steps)
    tx = optimizer.make_optimizer(config.optimizer, config.train.steps)
    # Under jit: eagerly, the init's forward and the optimizer init were dispatched op by op.
    state = jax.jit(lambda rng: create_train_state(model, tx, rng))(jax.random.key(0))
    return model, tx, schedule, state


def _jitted_sdar_loss(model, params, batch, rng):
    """The reference: sdar_loss called directly (not through the train step), under one jit
    rather than dispatched op by op."""
    fn = functools.partial(sdar_loss, functools.partial(transformer.apply, model),
                           block_size=4, mask_token_id=model.mask_token_id)
    return jax.jit(fn)(params, batch, rng)


def test_micro_batches_interleave_rows():
    batch = {"tokens": np.arange(12 * 3).reshape(12, 3)}
    micro = step._split_micro_batches(batch, 3)["tokens"]
    assert micro.shape == (3, 4, 3)
    for i in range(3):
        np.testing.assert_array_equal(micro[i], batch["tokens"][i::3])


def test_grad_accumulation_equals_one_shot_update():
    """AR objective (no noise): 4 micro-batches of 2 rows == one batch of 8 rows."""
    batch = next(synthetic_iterator(batch_size=8))
    results = []
    for accum in (1, 4):
        config = tiny_config()
        config.objective.kind = "ar"
        config.optimizer.grad_accum_steps = accum
        config.optimizer.warmup_steps = 0
        model, tx, schedule, state = _setup(config)
        train_step = step.compile_train_step(config, model, tx, schedule)
        results.append(train_step(state, batch))
    (s1, m1), (s4, m4) = results
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(m4["accuracy"], m1["accuracy"], rtol=1e-6)
    assert float(m1["grad_norm"]) > 0
    # Adam's first update is ~lr * sign(grad): compare to a thousandth of a step (lr = 3e-3).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=3e-6), s4.params, s1.params)
    assert int(s1.step) == int(s4.step) == 1


def test_bfloat16_compute_keeps_float32_master_params():
    config = tiny_config()
    config.model.dtype = "bfloat16"
    model, tx, schedule, state = _setup(config)
    assert model.dtype == "bfloat16" and model.param_dtype == "float32"
    new_state, metrics = step.compile_train_step(config, model, tx, schedule)(
        state, next(synthetic_iterator())
    )
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(new_state.params)}
    assert dtypes == {np.dtype("float32")}
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0


def test_moe_aux_loss_enters_the_objective():
    """tiny-moe: loss = sdar_loss + coef * aux_loss, with the coefficient from the config."""
    config = tiny_config()
    config.model.preset = "tiny-moe"
    config.model.overrides.update(dict(intermediate_size=0, num_layers=1))
    config.objective.aux_loss_coef = 0.5
    model, tx, schedule, state = _setup(config)
    assert model.is_moe and run_config.aux_loss_coef(config, model) == 0.5
    batch = next(synthetic_iterator())
    micro_key = jax.random.split(step_rng(state), 1)[0]
    loss, reference = _jitted_sdar_loss(model, state.params, batch, micro_key)
    _, metrics = step.compile_train_step(config, model, tx, schedule)(state, batch)
    assert float(reference["aux_loss"]) > 0
    np.testing.assert_allclose(metrics["aux_loss"], reference["aux_loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], loss + 0.5 * reference["aux_loss"], rtol=1e-5)


@pytest.fixture(scope="module")
def sdar_run():
    """40 SDAR steps on the synthetic task; the held-out loss before and after."""
    config = tiny_config()
    config.train.steps = 40
    config.optimizer.peak_lr = 1e-2
    model, tx, schedule, state = _setup(config)
    train_step = step.compile_train_step(config, model, tx, schedule)
    eval_fn = step.compile_eval_step(config, model)
    held_out = next(synthetic_iterator(seed=1))
    eval_key = jax.random.key(7)

    def held_out_loss(params):
        return step.reduce_eval([jax.device_get(eval_fn(params, held_out, eval_key))], 0.0)["loss"]

    initial = jax.tree.map(np.asarray, state)
    before = held_out_loss(state.params)
    data = synthetic_iterator()
    first_batch = next(data)
    history = []
    for i in range(config.train.steps):
        state, metrics = train_step(state, first_batch if i == 0 else next(data))
        history.append(jax.device_get(metrics))
    return dict(config=config, model=model, initial=initial, first_batch=first_batch,
                history=history, before=before, after=held_out_loss(state.params), state=state)


def test_reported_loss_is_the_sdar_objective(sdar_run):
    """Step 0's loss / accuracy are sdar_loss at the initial params with the step's key."""
    model, initial = sdar_run["model"], sdar_run["initial"]
    state0 = jax.tree.map(jax.numpy.asarray, initial)
    micro_key = jax.random.split(step_rng(state0), 1)[0]
    loss, metrics = _jitted_sdar_loss(model, state0.params, sdar_run["first_batch"], micro_key)
    first = sdar_run["history"][0]
    np.testing.assert_allclose(first["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(first["accuracy"], metrics["accuracy"], rtol=1e-5)
    assert first["num_loss_tokens"] == 8 * 2 * 12  # rows x examples x response tokens
    assert first["num_tokens"] == 8 * 32
    assert first["learning_rate"] == 0.0  # warmup starts at 0
    np.testing.assert_allclose(sdar_run["history"][2]["learning_rate"], 1e-2, rtol=1e-6)


def test_sdar_loss_falls(sdar_run):
    assert sdar_run["after"] < 0.7 * sdar_run["before"], (sdar_run["before"], sdar_run["after"])
    assert int(sdar_run["state"].step) == 40
