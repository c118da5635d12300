"""Params restored straight into their shardings, and the set-up of sharded inference.

A params checkpoint (`config.json` + an orbax tree under `params/`, the format
`sdar_jax.checkpoint.params.save_params_checkpoint` writes) is read with orbax, every
array restored directly with its target `NamedSharding`: tensorstore reads, on
each process, only the slices its devices own, so no array is ever whole on
one device (or one host) unless its sharding says so.

`setup_inference(ckpt_dir, "fsdp=4,tensor=2")` is what `--mesh` does for
generate and evaluate: it builds the run's `ShardingContext` from the mesh
spec (`sdar_jax.parallel.parse_mesh_spec`), derives every parameter's
sharding from the logical-axis rules and restores the params into them.
Decoding then runs inside the context:

    setup = setup_inference(ckpt_dir, "fsdp=4,tensor=2")
    with setup.context.activate():
        result = decoder.generate(setup.params, setup.config, prompts, lengths, rng, decode_config)

On several hosts call `sdar_jax.distributed.initialize_distributed()` first,
as `launch/train.py` does; every process then runs the same calls (the same
prompts on every process) and reads results with `to_host`, which gathers
arrays whose shards live on other processes' devices.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, ContextManager, NamedTuple, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from sdar_jax.checkpoint.dtypes import NUMPY_DTYPES
from sdar_jax.checkpoint.params import PARAMS_SUBDIR, load_params_checkpoint
from sdar_jax.config import ModelConfig, load_hf_config
from sdar_jax.model import sharding as model_sharding
from sdar_jax.model import transformer
from sdar_jax.parallel import ParallelConfig, Rules, ShardingContext, parse_mesh_spec

class RestoreError(ValueError):
    """The checkpoint cannot be restored with the requested layout."""


class InferenceSetup(NamedTuple):
    """What sharded generation or evaluation needs.

    context: the ShardingContext to run inside (`with setup.context.activate():`).
    config: the checkpoint's ModelConfig, param_dtype set to the restored dtype.
    params: the param tree of jax.Arrays, each with its rule-derived sharding.
    """

    context: ShardingContext
    config: ModelConfig
    params: dict


def _stored_tree(ckptr: ocp.StandardCheckpointer, params_dir: str) -> Any:
    metadata = ckptr.metadata(params_dir)
    # orbax >= 0.11 wraps the tree in StepMetadata.item_metadata; older returns it directly.
    return getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


def restore_params(
    ckpt_dir: str | os.PathLike, shardings: Any, shapes: Any, dtype: str | None = None
) -> dict:
    """Reads a params checkpoint's arrays directly into `shardings`.

    Args:
      ckpt_dir: the params checkpoint directory (with `params/`).
      shardings: a pytree of `jax.sharding.Sharding`, one per parameter.
      shapes: the matching pytree of ShapeDtypeStructs the model expects.
      dtype: "float32" or "bfloat16" to cast to while restoring; None keeps
        the stored dtype.

    Returns:
      The param tree of jax.Arrays laid out by `shardings`.

    Raises:
      RestoreError: the stored tree lacks a parameter, has an extra one, or a
        shape differs (all problems in one message), or dtype is unknown.
    """
    if dtype is not None and dtype not in NUMPY_DTYPES:
        raise RestoreError(f"dtype {dtype!r} is not one of {tuple(NUMPY_DTYPES)}")
    params_dir = os.path.join(os.path.abspath(os.fspath(ckpt_dir)), PARAMS_SUBDIR)
    if not os.path.isdir(params_dir):
        raise RestoreError(f"{ckpt_dir}: not a params checkpoint (no {PARAMS_SUBDIR}/ directory)")
    with ocp.StandardCheckpointer() as ckptr:
        stored = _stored_tree(ckptr, params_dir)
        have, want = _leaves_by_path(stored), _leaves_by_path(shapes)
        problems = [f"missing {p} {list(want[p].shape)}" for p in sorted(want.keys() - have.keys())]
        problems += [f"unexpected {p}" for p in sorted(have.keys() - want.keys())]
        problems += [
            f"{p}: stored shape {list(have[p].shape)}, expected {list(want[p].shape)}"
            for p in sorted(want.keys() & have.keys()) if tuple(have[p].shape) != tuple(want[p].shape)
        ]
        if problems:
            raise RestoreError(f"{ckpt_dir}: params do not match the model: " + "; ".join(problems))
        target = jax.tree.map(
            lambda meta, sharding: jax.ShapeDtypeStruct(
                tuple(meta.shape), NUMPY_DTYPES[dtype] if dtype else meta.dtype, sharding=sharding
            ),
            shapes, shardings,
        )
        return ckptr.restore(params_dir, target)


def to_host(tree: Any) -> Any:
    """numpy copies of a pytree of jax.Arrays on every process (sharded results of a
    multi-process run are all-gathered first; single-process arrays are just fetched)."""
    from jax.experimental import multihost_utils

    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def setup_inference(
    ckpt_dir: str | os.PathLike,
    mesh: str | ParallelConfig,
    *,
    dtype: str | None = None,
    devices: Sequence[jax.Device] | None = None,
    logical_rules: Rules | None = None,
) -> InferenceSetup:
    """The sharding context of a `--mesh` run and the checkpoint's params restored into it.

    Args:
      ckpt_dir: a params checkpoint directory.
      mesh: a `--mesh` value ("fsdp=4,tensor=2", -1 for the rest) or a ParallelConfig.
      dtype: cast the params while restoring ("float32" / "bfloat16"); None keeps them.
      devices: the mesh's devices (all global devices by default).
      logical_rules: rules to use with a string `mesh` (None: the defaults).

    Returns:
      InferenceSetup(context, config, params).

    Raises:
      ParallelConfigError: a bad mesh spec or one that does not fit the devices.
      RestoreError: the checkpoint does not match its config.
    """
    pconfig = parse_mesh_spec(mesh, logical_rules) if isinstance(mesh, str) else mesh
    context = ShardingContext.from_config(pconfig, devices)
    config = load_hf_config(ckpt_dir)
    shardings = model_sharding.param_shardings(config, context)
    params = restore_params(ckpt_dir, shardings, model_sharding.param_shapes(config), dtype)
    restored_dtype = {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(params)}
    names = [name for name, dt in NUMPY_DTYPES.items() if {dt} == restored_dtype]
    if names:
        config = config.replace(param_dtype=names[0])
    return InferenceSetup(context=context, config=config, params=params)


class InferenceModel(NamedTuple):
    """A checkpoint loaded for generation or evaluation.

    config, params: the model; params on one device without a mesh, else in
      their rule-derived shardings.
    context: the ShardingContext to decode inside, or None without a mesh.
    """

    config: ModelConfig
    params: dict
    context: ShardingContext | None


def load_for_inference(ckpt_dir: str | os.PathLike, mesh: str | None = None, *,
                       unstack_layers: bool = True) -> InferenceModel:
    """What `--mesh` selects for generate and evaluate: without a mesh the params are read whole
    onto the first local device (`checkpoint.params.load_params_checkpoint`); with one, `setup_inference`
    restores each straight into its sharding.

    `unstack_layers` splits the layers' stack into per-layer buffers
    (`transformer.unstack_layers`, each stacked array freed once split), which
    decoding reads faster; False keeps the scanned stack (one layer program to
    compile).

    Raises:
      ValueError (ConversionError, ParallelConfigError, RestoreError, ConfigError): a bad
        checkpoint or mesh, one line naming it.
    """
    if mesh is None:
        config, params = load_params_checkpoint(ckpt_dir)
        context = None
    else:
        setup = setup_inference(ckpt_dir, mesh)
        config, params, context = setup.config, setup.params, setup.context
    if unstack_layers:
        params = transformer.unstack_layers(params, free_stacked=True)
    return InferenceModel(config, params, context)


def activate(context: ShardingContext | None) -> ContextManager[Any]:
    """`context.activate()`, or a no-op without a mesh."""
    return contextlib.nullcontext() if context is None else context.activate()


def writes_outputs() -> bool:
    """Whether this process writes the run's output files and prints its results (process 0;
    every process computes them)."""
    return jax.process_index() == 0
