"""The parameter dtypes a params checkpoint stores, by name ("float32", "bfloat16")."""

from __future__ import annotations

from typing import Mapping

import jax
import ml_dtypes
import numpy as np

from sdar_jax.checkpoint.errors import ConversionError

NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for "float32" or "bfloat16" (bfloat16 from ml_dtypes)."""
    if name not in NUMPY_DTYPES:
        raise ConversionError(f"dtype {name!r} is not supported; expected one of {tuple(NUMPY_DTYPES)}")
    return NUMPY_DTYPES[name]


def params_dtype(params: Mapping) -> str:
    """The name of the one dtype of every leaf of `params` (arrays or ShapeDtypeStruct-likes)."""
    dtypes = {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(params)}
    for name, dt in NUMPY_DTYPES.items():
        if dtypes == {dt}:
            return name
    raise ConversionError(f"params mix or use unsupported dtypes {sorted(map(str, dtypes))}; "
                          f"expected all {tuple(NUMPY_DTYPES)[0]} or all {tuple(NUMPY_DTYPES)[1]}")
