"""The model reads its dtype and remat names from `sdar_jax.config`: every name there resolves."""

import jax
import jax.numpy as jnp
import pytest

from sdar_jax import config
from sdar_jax.model import layers, transformer


def test_every_config_dtype_is_a_jnp_type():
    assert {name: layers.dtype_of(name) for name in config.DTYPES} == {
        "float32": jnp.float32, "bfloat16": jnp.bfloat16}
    with pytest.raises(ValueError, match="'float16' is not one of"):
        layers.dtype_of("float16")


def test_every_config_remat_policy_but_none_is_a_jax_policy():
    policies = {name: transformer.remat_policy(name) for name in config.REMAT_POLICIES if name != "none"}
    assert policies["full"] is jax.checkpoint_policies.nothing_saveable
    assert policies["dots_saveable"] is jax.checkpoint_policies.dots_saveable
    assert all(callable(policy) for policy in policies.values())
    with pytest.raises(ValueError, match="'none' names no policy"):
        transformer.remat_policy("none")
