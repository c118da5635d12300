"""The model's parameters under a `ShardingContext`: their specs, shardings and train-state layout.

`sdar_jax.parallel` maps trees of logical axes to shardings and knows nothing
of the model; this module hands it the model's trees (the logical names every
initializer declares, and the parameter shapes), all from abstract
evaluation, so nothing is allocated.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from sdar_jax.config import ModelConfig
from sdar_jax.model import transformer
from sdar_jax.parallel import ShardingContext


def param_shapes(config: ModelConfig) -> dict:
    """ShapeDtypeStructs of every parameter, a tree like `transformer.init_params`."""
    return nn.unbox(transformer.abstract_params(config))


def param_shapes_and_logical_axes(config: ModelConfig) -> tuple[dict, dict]:
    """`param_shapes(config)` and `transformer.param_logical_axes(config)` from one abstract evaluation."""
    boxed = transformer.abstract_params(config)
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def param_specs(config: ModelConfig, context: ShardingContext) -> dict:
    """PartitionSpecs (over mesh axes) of every parameter under the context's rules."""
    return context.tree_specs(transformer.param_logical_axes(config), param_shapes(config))


def param_shardings(config: ModelConfig, context: ShardingContext) -> dict:
    """NamedShardings of every parameter, a tree like `transformer.init_params`."""
    return context.tree_shardings(transformer.param_logical_axes(config), param_shapes(config))


def state_shardings(abstract_state: Any, config: ModelConfig, context: ShardingContext) -> Any:
    """NamedShardings of a train state (params, optimizer moments, ...; see
    `ShardingContext.state_shardings`)."""
    return context.state_shardings(
        abstract_state, transformer.param_logical_axes(config), param_shapes(config)
    )
