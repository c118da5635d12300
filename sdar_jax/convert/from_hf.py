"""Hugging Face safetensors directory -> sdar_jax params: a params checkpoint (streamed) or in memory.

`hf_to_jax` checks the output directory, then config.json and every tensor
header against the rules (`check_tensors`: every mismatch in one
`ConversionError`), and a stored copy of a tied head against the embedding;
only then does it write. Each piece (one layer's or expert's tensor, or a
block of the embedding / head) is read from its file and written into its
chunk of the stored stacked parameter with tensorstore as it is read, so
peak memory does not depend on the model's size. The checkpoint appears
under its name only when complete (`AtomicDir`). `hf_to_params` reads the
same pieces into in-memory arrays.

Needs numpy, ml_dtypes, safetensors, tensorstore and orbax (no torch, no
transformers).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable, Mapping

import numpy as np

from sdar_jax.checkpoint.atomic import AtomicDir, check_output_dir
from sdar_jax.checkpoint.dtypes import numpy_dtype
from sdar_jax.checkpoint.errors import ConversionError, first_line
from sdar_jax.checkpoint.params import CONFIG_FILE, PARAMS_SUBDIR, copy_aux_files, write_config
from sdar_jax.checkpoint.tree import get_path, set_path
from sdar_jax.config import ModelConfig, from_hf_config, read_hf_config_json
from sdar_jax.convert import hf_rules
from sdar_jax.convert.freed_memory import FreedMemory
from sdar_jax.convert.hf_rules import Piece, TensorRule, hf_pieces, tensor_rules
from sdar_jax.convert.param_stores import create_param_stores
from sdar_jax.convert.safetensors_io import (
    FLOAT_DTYPES,
    SafetensorsReader,
    TensorHeader,
    find_safetensors,
    read_headers,
)

# Tensors some checkpoints carry that hold no parameters (recomputed buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Pieces whose tensorstore write may still be running while the next is read.
_WRITES_IN_FLIGHT = 2


def check_tensors(config: ModelConfig, headers: Mapping[str, Any]) -> list[str]:
    """Every mismatch between the tensors present and what `config` needs.

    Args:
      config: the model config.
      headers: tensor name -> object with `.shape` (tuple) and `.dtype`
        (safetensors code, e.g. "BF16").

    Returns:
      One line per problem (missing, unexpected, wrong shape, unsupported
      dtype), sorted by kind then name; empty when everything matches.
    """
    expected: dict[str, TensorRule] = {}
    for rule in tensor_rules(config):
        for name, _ in rule.instances(config):
            expected[name] = rule
    problems = []
    for name in sorted(expected.keys() - headers.keys()):
        problems.append(f"missing tensor {name} (shape {list(expected[name].hf_shape)})")
    for name in sorted(headers.keys() - expected.keys()):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a stored copy of the tied embedding; checked to be equal when read
        problems.append(f"unexpected tensor {name} (shape {list(headers[name].shape)})")
    want_shapes = {name: rule.hf_shape for name, rule in expected.items() if name in headers}
    if config.tie_word_embeddings and "lm_head.weight" in headers:
        want_shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    for name, want in sorted(want_shapes.items()):
        header = headers[name]
        if tuple(header.shape) != tuple(want):
            problems.append(f"wrong shape for {name}: got {list(header.shape)}, expected {list(want)}")
        if header.dtype not in FLOAT_DTYPES:
            problems.append(
                f"unsupported dtype for {name}: got {header.dtype}, expected one of {FLOAT_DTYPES}"
            )
    return problems


def _default_dtype(headers: Mapping[str, TensorHeader]) -> str:
    dtypes = {h.dtype for h in headers.values()}
    return "bfloat16" if dtypes == {"BF16"} else "float32"


@dataclasses.dataclass(frozen=True)
class _Source:
    """A checked Hugging Face directory: what to read, where, into which config."""

    hf_dir: str
    config: ModelConfig
    hf_config: dict[str, Any]  # the source's config.json
    located: dict[str, str]  # tensor name -> file

    def pieces_by_file(self) -> list[tuple[str, list[Piece]]]:
        """Every piece, grouped by the file holding it (files in name order)."""
        by_file: dict[str, list[Piece]] = {}
        for name, pieces in hf_pieces(self.config, self.config.param_dtype).items():
            by_file.setdefault(self.located[name], []).extend(pieces)
        return sorted(by_file.items())


def _check_source(hf_dir: str | os.PathLike, dtype: str | None) -> _Source:
    """Reads config.json and every tensor header and checks them (no tensor data is read)."""
    hf_dir = os.fspath(hf_dir)
    located = find_safetensors(hf_dir)
    config_path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ConversionError(f"{hf_dir}: no {CONFIG_FILE}")
    headers = read_headers(located)
    dtype = dtype or _default_dtype(headers)
    numpy_dtype(dtype)
    config_path, raw = read_hf_config_json(config_path)
    config = from_hf_config(raw, source=config_path, param_dtype=dtype)
    problems = check_tensors(config, headers)
    if problems:
        raise ConversionError(
            f"{hf_dir}: {len(problems)} tensor(s) do not match {config_path}:\n  " + "\n  ".join(problems)
        )
    return _Source(hf_dir, config, raw, located)


def _check_tied_head(source: _Source, reader: SafetensorsReader) -> None:
    """A tied config with a stored lm_head.weight: it must equal the embedding
    (compared block by block, in the output dtype)."""
    config, located = source.config, source.located
    if not config.tie_word_embeddings or "lm_head.weight" not in located:
        return
    out_dtype = numpy_dtype(config.param_dtype)
    embed = "model.embed_tokens.weight"
    rows = max(1, hf_rules.PIECE_BYTES // (config.hidden_size * out_dtype.itemsize))
    for start in range(0, config.vocab_size, rows):
        block = slice(start, min(start + rows, config.vocab_size))
        head = reader.read(located["lm_head.weight"], "lm_head.weight", block).astype(out_dtype)
        if not np.array_equal(head, reader.read(located[embed], embed, block).astype(out_dtype)):
            raise ConversionError(
                f"{source.hf_dir}: config ties the embeddings but lm_head.weight differs from "
                f"{embed} (rows {block.start}-{block.stop - 1})"
            )


def _convert_pieces(
    source: _Source, reader: SafetensorsReader, write: Callable[[Piece, np.ndarray], None],
) -> None:
    """Reads every piece in file order and hands it, in the parameter's
    layout and dtype, to `write(piece, value)`."""
    out_dtype = numpy_dtype(source.config.param_dtype)
    for path, pieces in source.pieces_by_file():
        pieces.sort(key=lambda piece: (reader.offset(path, piece.name), piece.rows and piece.rows.start))
        for piece in pieces:
            value = piece.to_param(reader.read(path, piece.name, piece.rows))
            write(piece, value.astype(out_dtype, copy=False))


def hf_to_params(hf_dir: str | os.PathLike, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """Reads a Hugging Face safetensors directory into sdar_jax params in memory.

    (`hf_to_jax` converts to a checkpoint without holding the params.)

    Args:
      hf_dir: a directory with `config.json` and `model.safetensors` or
        shards with `model.safetensors.index.json`.
      dtype: "float32" or "bfloat16" for the params; None keeps bfloat16 when
        every tensor is BF16 and uses float32 otherwise.

    Returns:
      (config with param_dtype set, param tree of numpy arrays in the stacked
      layout of `tensor_rules`).

    Raises:
      ConversionError: listing every missing, unexpected, misshapen or
        wrongly typed tensor, or naming the unreadable input.
    """
    source = _check_source(hf_dir, dtype)
    config = source.config
    out_dtype = numpy_dtype(config.param_dtype)
    params: dict = {}
    for rule in tensor_rules(config):
        set_path(params, rule.path, np.empty(rule.full_shape(config), out_dtype))

    def write(piece: Piece, value: np.ndarray) -> None:
        get_path(params, piece.rule.path)[piece.param_region()] = value

    with SafetensorsReader() as reader:
        _check_tied_head(source, reader)
        _convert_pieces(source, reader, write)
    return config, params


def hf_to_jax(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None, *,
    overwrite: bool = False,
) -> ModelConfig:
    """Hugging Face safetensors directory -> params checkpoint, piece by piece.

    The output directory is checked first, then config.json and every
    tensor header (and a tied lm_head's values); only then is anything
    written. Each piece (one layer's or expert's tensor, or a block of the
    embedding / head) goes into its chunk of the stored stacked parameter as
    it is read: neither a stacked array nor the model is ever held.
    Tokenizer files of `hf_dir` (and remote code its auto_map names) are
    copied into the checkpoint; config.json keeps the source's other keys.
    Returns the config.
    """
    hf_dir = os.fspath(hf_dir)
    check_output_dir(out_dir, overwrite, sources=(hf_dir,))
    source = _check_source(hf_dir, dtype)
    with SafetensorsReader() as reader:
        _check_tied_head(source, reader)
        with AtomicDir(out_dir, overwrite, sources=(hf_dir,)) as tmp:
            write_config(tmp, source.config, base=source.hf_config)
            stores = create_param_stores(os.path.join(tmp, PARAMS_SUBDIR), source.config)
            pending: collections.deque = collections.deque()
            freed = FreedMemory()

            def finish_one() -> None:
                piece, nbytes, future = pending.popleft()
                try:
                    future.result()
                except ValueError as e:  # tensorstore reports I/O errors (disk full, ...) as ValueError
                    raise ConversionError(f"{out_dir}: writing {piece.name} failed ({first_line(e)})") from e
                freed.add(nbytes)

            def write(piece: Piece, value: np.ndarray) -> None:
                store = stores[piece.rule.path]
                region = piece.param_region()
                pending.append((piece, value.nbytes, (store[region] if region else store).write(value)))
                while len(pending) > _WRITES_IN_FLIGHT:
                    finish_one()

            _convert_pieces(source, reader, write)
            while pending:
                finish_one()
            copy_aux_files(hf_dir, tmp, source.hf_config)
    return source.config
