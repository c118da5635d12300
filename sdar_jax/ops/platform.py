"""The one resolver of "auto" implementation names, from the default JAX backend.

`ops.attention` ("auto" -> the Pallas kernels or the XLA reference) and
`ops.grouped_matmul` ("auto" -> ragged_dot or the tiled loop) name their own
implementations and resolve them here.
"""

from __future__ import annotations

import jax

ACCELERATORS = ("gpu", "tpu")


def accelerator() -> str | None:
    """"gpu" or "tpu" when that is the default JAX backend, None otherwise (CPU)."""
    platform = jax.default_backend()
    return platform if platform in ACCELERATORS else None


def resolve(impl: str, allowed: tuple[str, ...], *, accelerated: str, portable: str, what: str) -> str:
    """Checks `impl` against `allowed`; "auto" becomes `accelerated` on a GPU or TPU and
    `portable` elsewhere. `what` names the operation in the error."""
    if impl not in allowed:
        raise ValueError(f"{what} impl {impl!r} is not one of {allowed}")
    if impl != "auto":
        return impl
    return accelerated if accelerator() else portable
