"""A params checkpoint's arrays as tensorstores, so conversions read and write them region by region.

`create_param_stores` makes the orbax params checkpoint `hf_to_jax` writes:
orbax writes the tree metadata, and every parameter is one zarr array
(no OCDBT) chunked by `TensorRule.chunk_shape`, so each piece is exactly one
chunk, written once. `open_param_stores` opens every parameter of an existing
params checkpoint (either layout: OCDBT or one zarr array per parameter) for
`jax_to_hf` to read piece by piece.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint import type_handlers

from sdar_jax.checkpoint.dtypes import numpy_dtype
from sdar_jax.checkpoint.errors import ConversionError, first_line
from sdar_jax.checkpoint.params import StoredParams
from sdar_jax.checkpoint.tree import set_path
from sdar_jax.config import ModelConfig
from sdar_jax.convert.hf_rules import tensor_rules


def open_param_stores(stored: StoredParams) -> dict[tuple[str, ...], Any]:
    """Every parameter of a params checkpoint as a tensorstore opened for
    reading regions (either layout: OCDBT or one zarr array per parameter)."""
    context = type_handlers.get_ts_context(use_ocdbt=stored.use_ocdbt)
    stores = {}
    for rule in tensor_rules(stored.config):
        info = type_handlers.ParamInfo(
            name=".".join(rule.path), parent_dir=epath.Path(stored.params_dir),
            use_zarr3=stored.use_zarr3, ts_context=context,
        )
        spec = type_handlers.get_json_tspec_read(info, use_ocdbt=stored.use_ocdbt)
        try:
            stores[rule.path] = ts.open(spec, open=True, read=True, context=context).result()
        except ValueError as e:
            raise ConversionError(
                f"{stored.ckpt_dir}: incomplete params checkpoint: cannot open param "
                f"{'/'.join(rule.path)} ({first_line(e)})"
            ) from e
    return stores


def create_param_stores(params_dir: str, config: ModelConfig) -> dict[tuple[str, ...], Any]:
    """An orbax params checkpoint at `params_dir` whose arrays are empty
    tensorstores, one zarr array per parameter, chunked as `TensorRule.chunk_shape`.

    orbax itself writes the tree metadata (from placeholder leaves, one
    element each; it stores no shapes there), then each placeholder array is
    replaced by the full-size one; every chunk must then be written.
    """
    dtype = numpy_dtype(config.param_dtype)
    rules = tensor_rules(config)
    placeholders: dict = {}
    for rule in rules:
        set_path(placeholders, rule.path, np.zeros((1,) * len(rule.full_shape(config)), dtype))
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns that there is no OCDBT to merge: none is wanted
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False)) as ckptr:
            ckptr.save(params_dir, args=ocp.args.StandardSave(placeholders))
    finally:
        absl_logger.setLevel(level)
    context = type_handlers.get_ts_context(use_ocdbt=False)
    stores = {}
    for rule in rules:
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": os.path.join(params_dir, ".".join(rule.path))},
            "dtype": dtype.name,
            "metadata": {
                "shape": list(rule.full_shape(config)),
                "chunks": list(rule.chunk_shape(config, dtype.itemsize)),
                "compressor": {"id": "zstd", "level": 1},  # what orbax writes
                "dimension_separator": ".",
            },
            # orbax reads with fill_missing_data_reads=False: an all-zero chunk must exist too.
            "store_data_equal_to_fill_value": True,
        }
        stores[rule.path] = ts.open(spec, create=True, delete_existing=True, context=context).result()
    return stores
