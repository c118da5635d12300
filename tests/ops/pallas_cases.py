"""Shared inputs for the Pallas kernel tests (from `sdar_jax.ops.kernel_check`) and a lowering target."""

from __future__ import annotations

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from sdar_jax.ops.kernel_check import (  # noqa: F401 - re-exported for the tests
    decode_inputs, max_errors, output_and_grads, packed_rows, qkv, reference, relative_errors,
    training_inputs,
)


def lowering_target(device_kind: str, platform: str, num_cores: int):
    """A context naming the device to lower for on a machine without it.

    JAX 0.11 asks the abstract mesh for the target of an ahead-of-time Triton or
    Mosaic lowering (GPU compute capability, TPU generation) instead of the
    local device; 0.10 reads the same field for Mosaic. The mesh has one device,
    so nothing is sharded.
    """
    device = AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform=platform)
    mesh = AbstractMesh((1,), ("lowering",), (AxisType.Explicit,), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)
