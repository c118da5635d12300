"""sdar_jax params -> a Hugging Face directory (safetensors + config.json), streamed or from memory.

`jax_to_hf` checks the output directory and the params checkpoint (its
metadata against config.json), then reads the parameters region by region
with tensorstore and appends each tensor to the safetensors shard being
written, so peak memory does not depend on the model's size; the directory
appears under its name only when complete. `write_hf_weights` writes
in-memory params the same way.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Iterator, Mapping

import numpy as np

from sdar_jax.checkpoint.atomic import AtomicDir, check_output_dir
from sdar_jax.checkpoint.dtypes import numpy_dtype
from sdar_jax.checkpoint.errors import ConversionError, first_line
from sdar_jax.checkpoint.params import check_param_shapes, copy_aux_files, read_stored_params, write_config
from sdar_jax.checkpoint.tree import get_path
from sdar_jax.config import ModelConfig
from sdar_jax.convert.freed_memory import FreedMemory
from sdar_jax.convert.hf_rules import Piece, hf_pieces
from sdar_jax.convert.param_stores import open_param_stores
from sdar_jax.convert.safetensors_io import DEFAULT_MAX_SHARD_BYTES, write_safetensors


class ExportWarning(UserWarning):
    """An exported checkpoint that engines reading the release's format will misread."""


def _write_hf_pieces(
    out_dir: str, config: ModelConfig, read: Callable[[Piece], np.ndarray], dtype: str,
    max_shard_bytes: int,
) -> None:
    """Writes the safetensors of `config`, each piece's values from `read`
    (the parameter region `piece.param_region()`)."""
    pieces = hf_pieces(config, dtype)

    def produce(name: str) -> Iterator[np.ndarray]:
        for piece in pieces[name]:
            yield piece.to_hf(read(piece))

    tensors = [(name, group[0].rule.hf_shape) for name, group in pieces.items()]
    write_safetensors(out_dir, tensors, produce, dtype, max_shard_bytes)


def write_hf_weights(
    out_dir: str, config: ModelConfig, params: Mapping, dtype: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes in-memory params as Hugging Face safetensors (see write_safetensors)."""
    check_param_shapes(config, params, "write_hf_weights")

    def read(piece: Piece) -> np.ndarray:
        return np.asarray(get_path(params, piece.rule.path)[piece.param_region()])

    _write_hf_pieces(out_dir, config, read, dtype, max_shard_bytes)


def release_incompatibility(config: ModelConfig) -> str | None:
    """Why the SDAR release's modeling code cannot decode `config`'s model, or None."""
    reasons = []
    if config.logits_convention == "shifted":
        reasons.append(
            f"the model reads the token at position j from the output at j - 1 (logits_convention="
            f"{config.logits_convention!r}); the release reads it from the output at j")
    if config.causal_in_block:
        reasons.append(
            f"its tokens attend causally inside a block (block_attention={config.block_attention!r});"
            " the release attends bidirectionally")
    if not reasons:
        return None
    return ("; ".join(reasons) + " (written to config.json): the SDAR release's modeling code and "
            "engines that follow it cannot decode this model")


def jax_to_hf(
    ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None, *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
) -> ModelConfig:
    """Params checkpoint -> Hugging Face directory (safetensors + config.json),
    reading the params region by region and writing each shard as it goes.

    config.json keeps the checkpoint's model_type and architectures (SDAR
    stays `sdar` / `SDARForCausalLM`; transformers loads it with the
    release's remote code, copied along when the source had it; Qwen3 and
    Llama load with transformers' own classes) and its other keys. A model
    with `logits_convention="shifted"` or `block_attention="causal"` is
    exported with that key and an `ExportWarning`: the release's code cannot
    decode it.

    Args:
      ckpt_dir: a params checkpoint.
      out_dir: the directory to create.
      dtype: tensor dtype to write; None keeps the checkpoint's.
      max_shard_bytes: the largest shard; more shards get an index file.
      overwrite: replace an existing `out_dir`.

    Returns:
      The config written.
    """
    ckpt_dir = os.fspath(ckpt_dir)
    check_output_dir(out_dir, overwrite, sources=(ckpt_dir,))
    stored = read_stored_params(ckpt_dir)
    dtype = dtype or stored.config.param_dtype
    numpy_dtype(dtype)
    config = stored.config.replace(param_dtype=dtype)
    stores = open_param_stores(stored)
    freed = FreedMemory()

    def read(piece: Piece) -> np.ndarray:
        store = stores[piece.rule.path]
        region = piece.param_region()
        try:
            value = (store[region] if region else store).read().result()
            freed.add(value.nbytes)
            return value
        except ValueError as e:
            raise ConversionError(
                f"{ckpt_dir}: incomplete or damaged params checkpoint: cannot read "
                f"{'/'.join(piece.rule.path)}{list(piece.index) or ''} ({first_line(e)})"
            ) from e

    incompatibility = release_incompatibility(config)
    if incompatibility:
        warnings.warn(incompatibility, ExportWarning, stacklevel=2)
    with AtomicDir(out_dir, overwrite, sources=(ckpt_dir,)) as tmp:
        _write_hf_pieces(tmp, config, read, dtype, max_shard_bytes)
        write_config(tmp, config, base=stored.hf_config)
        copy_aux_files(ckpt_dir, tmp, stored.hf_config)
    return config
