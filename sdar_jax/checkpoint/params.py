"""Params checkpoints: `config.json` + an orbax tree of the params under `params/` (+ tokenizer files).

A params checkpoint is what the trainer exports, what `hf_to_jax` writes and
what every launcher loads: a directory with `config.json` (`to_hf_config`,
with the source's other keys kept), an orbax checkpoint of the param pytree
under `params/`, and the source's tokenizer (and remote-code) files, if any.
`save_params_checkpoint` lets orbax write OCDBT; `sdar_jax.convert.from_hf`
writes one zarr array per parameter (no OCDBT). `load_params_checkpoint`
restores both, sharded restores included; `read_stored_params` checks one
from its metadata alone. The params must have the model's tree
(`sdar_jax.model.sharding.param_shapes`): every problem is reported in one
`ConversionError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from sdar_jax.checkpoint.atomic import AtomicDir
from sdar_jax.checkpoint.dtypes import numpy_dtype, params_dtype
from sdar_jax.checkpoint.errors import ConversionError, first_line
from sdar_jax.checkpoint.tree import flatten
from sdar_jax.config import ModelConfig, from_hf_config, read_hf_config_json, to_hf_config
from sdar_jax.model import sharding as model_sharding

PARAMS_SUBDIR = "params"
CONFIG_FILE = "config.json"
# Tokenizer and generation files copied along with the weights (both directions).
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
    "special_tokens_map.json", "chat_template.jinja", "generation_config.json",
)
# orbax's file (in the params directory) that holds the tree; written last.
_ORBAX_TREE_METADATA = "_METADATA"


def _remote_code_files(hf_config: Mapping[str, Any] | None) -> list[str]:
    """The `.py` files a config's `auto_map` names (SDAR's modeling code)."""
    files = []
    for value in dict((hf_config or {}).get("auto_map") or {}).values():
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(ref, str) and "." in ref:
                module = ref.split("--")[-1].rsplit(".", 1)[0]
                files.append(module.replace(".", os.sep) + ".py")
    return sorted(set(files))


def copy_aux_files(src_dir: str, dst_dir: str, hf_config: Mapping[str, Any] | None = None) -> None:
    """Copies the tokenizer / generation files (AUX_FILES) and the remote
    code that `hf_config`'s auto_map names, those that exist."""
    for name in AUX_FILES + tuple(_remote_code_files(hf_config)):
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst_dir, name)), exist_ok=True)
            shutil.copyfile(src, os.path.join(dst_dir, name))


def write_config(out_dir: str, config: ModelConfig, base: Mapping[str, Any] | None = None) -> None:
    """Writes `<out_dir>/config.json` for `config`, keeping `base`'s other keys."""
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(to_hf_config(config, base), f, indent=2, sort_keys=True)


def _write_params(out_dir: str, config: ModelConfig, params: Mapping) -> None:
    write_config(out_dir, config)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, PARAMS_SUBDIR), params)
        ckptr.wait_until_finished()


def check_param_shapes(config: ModelConfig, params_or_shapes: Mapping, source: str) -> None:
    """Raises ConversionError (prefixed with `source`) listing every param missing,
    unexpected or misshapen against the model of `config`; leaves need only `.shape`."""
    want = {path: tuple(leaf.shape) for path, leaf in flatten(model_sharding.param_shapes(config)).items()}
    got = {path: tuple(leaf.shape) for path, leaf in flatten(params_or_shapes).items()}
    problems = [f"missing param {'/'.join(p)} {list(want[p])}" for p in sorted(want.keys() - got.keys())]
    problems += [f"unexpected param {'/'.join(p)} {list(got[p])}" for p in sorted(got.keys() - want.keys())]
    problems += [
        f"wrong shape for {'/'.join(p)}: got {list(got[p])}, expected {list(want[p])}"
        for p in sorted(want.keys() & got.keys()) if got[p] != want[p]
    ]
    if problems:
        raise ConversionError(f"{source}: params do not match the config:\n  " + "\n  ".join(problems))


def save_params_checkpoint(
    out_dir: str | os.PathLike, config: ModelConfig, params: Mapping, *, overwrite: bool = False,
    aux_dir: str | os.PathLike | None = None,
) -> None:
    """Writes `config.json` + an orbax checkpoint of `params` under `params/`.

    Args:
      out_dir: the checkpoint directory to create (must not exist unless
        `overwrite`); written under a temporary name and renamed at the end.
      config: the model config; its param_dtype is set from the params.
      params: the param tree (numpy or jax arrays, possibly sharded), all
        float32 or all bfloat16, shaped as the model's params.
      overwrite: replace an existing `out_dir`.
      aux_dir: a directory whose tokenizer/generation files (AUX_FILES) are
        copied along.
    """
    check_param_shapes(config, params, "save_params_checkpoint")
    config = config.replace(param_dtype=params_dtype(params))
    if jax.process_count() > 1:
        _save_params_multihost(out_dir, config, params, overwrite, aux_dir)
        return
    with AtomicDir(out_dir, overwrite) as tmp:
        _write_params(tmp, config, params)
        if aux_dir is not None:
            copy_aux_files(os.fspath(aux_dir), tmp)


def _save_params_multihost(
    out_dir: str | os.PathLike, config: ModelConfig, params: Mapping, overwrite: bool,
    aux_dir: str | os.PathLike | None,
) -> None:
    """`save_params_checkpoint` when several processes hold the params' shards.

    Every process must write into the same directory (orbax saves each
    process's shards and waits for all of them), so the temporary directory
    has a fixed name; process 0 creates it, writes config.json and the aux
    files, and renames it once every process's shards are written.
    """
    from jax.experimental import multihost_utils

    target = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(target) and not overwrite:  # checked on every process: all raise together
        raise ConversionError(f"{target}: already exists (choose a new output directory)")
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-multihost")
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write_config(tmp, config)
        if aux_dir is not None:
            copy_aux_files(os.fspath(aux_dir), tmp)
    multihost_utils.sync_global_devices(f"save_params_checkpoint {target}: directory made")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(tmp, PARAMS_SUBDIR), params)
        ckptr.wait_until_finished()
    multihost_utils.sync_global_devices(f"save_params_checkpoint {target}: params written")
    if primary:
        os.chmod(tmp, 0o755)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(tmp, target)
    multihost_utils.sync_global_devices(f"save_params_checkpoint {target}: renamed")


@dataclasses.dataclass(frozen=True)
class StoredParams:
    """A params checkpoint's config and the orbax metadata of its params."""

    ckpt_dir: str
    params_dir: str
    config: ModelConfig  # param_dtype set to the stored dtype
    hf_config: dict[str, Any]  # config.json as stored
    tree: Mapping  # leaves with .shape and .dtype
    use_ocdbt: bool
    use_zarr3: bool


def read_stored_params(ckpt_dir: str | os.PathLike) -> StoredParams:
    """Checks a params checkpoint is complete and matches its config.json
    (metadata only; no array data is read)."""
    ckpt_dir = os.fspath(ckpt_dir)
    params_dir = os.path.join(os.path.abspath(ckpt_dir), PARAMS_SUBDIR)
    if not os.path.isdir(params_dir):
        raise ConversionError(f"{ckpt_dir}: not a params checkpoint (no {PARAMS_SUBDIR}/ directory)")
    config_path, hf_config = read_hf_config_json(ckpt_dir)
    config = from_hf_config(hf_config, source=config_path)
    metadata_file = os.path.join(params_dir, _ORBAX_TREE_METADATA)
    if not os.path.isfile(metadata_file):
        raise ConversionError(
            f"{ckpt_dir}: incomplete params checkpoint: {PARAMS_SUBDIR}/{_ORBAX_TREE_METADATA} is "
            "missing (was the save interrupted?)"
        )
    try:
        with open(metadata_file) as f:
            tree_format = json.load(f)
        with ocp.StandardCheckpointer() as ckptr:
            metadata = ckptr.metadata(params_dir)
    except Exception as e:  # orbax raises many kinds; all mean the same here
        raise ConversionError(
            f"{ckpt_dir}: unreadable params checkpoint ({first_line(e)})"
        ) from e
    # orbax >= 0.11 wraps the tree in StepMetadata.item_metadata; older returns it directly.
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    if not isinstance(tree, Mapping) or not isinstance(tree_format, Mapping):
        raise ConversionError(
            f"{ckpt_dir}: incomplete params checkpoint: {PARAMS_SUBDIR}/ holds no param tree"
        )
    check_param_shapes(config, tree, ckpt_dir)
    return StoredParams(
        ckpt_dir, params_dir, config.replace(param_dtype=params_dtype(tree)), hf_config, tree,
        use_ocdbt=bool(tree_format.get("use_ocdbt", os.path.isfile(os.path.join(params_dir, "manifest.ocdbt")))),
        use_zarr3=bool(tree_format.get("use_zarr3", False)),
    )


def load_params_checkpoint(
    ckpt_dir: str | os.PathLike, dtype: str | None = None, shardings: Any = None,
) -> tuple[ModelConfig, dict]:
    """Reads a params checkpoint (`save_params_checkpoint` or `hf_to_jax`).

    Args:
      ckpt_dir: the checkpoint directory.
      dtype: cast the params to "float32" / "bfloat16" while restoring; None
        keeps the stored dtype.
      shardings: a pytree like the params whose leaves are
        `jax.sharding.Sharding`s (e.g. NamedSharding): every array is restored
        directly with its sharding. None puts everything on the first local
        device.

    Returns:
      (config with param_dtype set to the restored dtype, params of jax arrays).

    Raises:
      ConversionError: not a params checkpoint, an incomplete or unreadable
        one (naming the directory), or params that do not match config.json.
    """
    stored = read_stored_params(ckpt_dir)
    ckpt_dir = stored.ckpt_dir
    dtype = dtype or stored.config.param_dtype
    target_dtype = numpy_dtype(dtype)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, stored.tree)
    elif jax.tree.structure(shardings) != jax.tree.structure(stored.tree):
        raise ConversionError(
            f"{ckpt_dir}: shardings tree {jax.tree.structure(shardings)} does not match the "
            f"stored params {jax.tree.structure(stored.tree)}"
        )
    target = jax.tree.map(
        lambda meta, sharding: jax.ShapeDtypeStruct(meta.shape, target_dtype, sharding=sharding),
        stored.tree, shardings,
    )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(stored.params_dir, target)
    except Exception as e:  # a missing or damaged array file: orbax and tensorstore raise many kinds
        raise ConversionError(
            f"{ckpt_dir}: incomplete or damaged params checkpoint ({first_line(e)})"
        ) from e
    return stored.config.replace(param_dtype=dtype), params
