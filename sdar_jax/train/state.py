"""The training state: step, float32 master params, optimizer state, PRNG key.

The PRNG key is stored as raw key data (uint32 [2]) so that checkpoints hold
a plain array; `step_rng` derives the key of a step by folding the step number
into it, so a restored state draws exactly the noise an uninterrupted run
would have drawn.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sdar_jax.config import ModelConfig
from sdar_jax.model import transformer


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar, the number of optimizer updates applied so far.
    params: the model parameters (param_dtype, float32 by default: the master copy).
    opt_state: the optax state of `params`.
    rng: uint32 [2] raw PRNG key data, constant over the run (see `step_rng`).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def step_rng(state: TrainState) -> jax.Array:
    """The PRNG key of the state's current step (a typed key)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def create_train_state(
    model: ModelConfig,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    params: Any | None = None,
) -> TrainState:
    """A fresh state at step 0.

    Args:
      model: the model config (param dtype, shapes).
      tx: the optimizer.
      rng: a typed PRNG key; split into the init key and the run key.
      params: initial parameters (e.g. a converted HF checkpoint); None draws
        random ones with `transformer.init_params`.
    """
    init_rng, run_rng = jax.random.split(rng)
    if params is None:
        params = transformer.init_params(model, init_rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(run_rng),
    )


def abstract_train_state(
    model: ModelConfig, tx: optax.GradientTransformation
) -> TrainState:
    """The state's shapes and dtypes (ShapeDtypeStructs), without allocating it."""
    return jax.eval_shape(lambda: create_train_state(model, tx, jax.random.key(0)))
