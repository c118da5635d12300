"""Hugging Face safetensors checkpoints <-> sdar_jax parameter checkpoints.

The mapping is a table of per-tensor rules (`tensor_rules`): each rule names
one family of Hugging Face tensors (`model.layers.{layer}.self_attn.q_proj.weight`),
the sdar_jax parameter it fills (`layers/self_attn/q_proj/kernel`), and the
shapes on both sides. A rule whose name holds `{layer}` (and `{expert}`) fills
one slice of a parameter stacked over the leading `[layers]` (and `[experts]`)
axes. Hugging Face linear weights are `[out, in]`; rules with
`transpose=True` turn them into `[in, out]` and reshape the result, e.g.
q_proj `[heads * head_dim, hidden]` -> `[hidden, heads, head_dim]`.

To support new tensor names (another family, another MLP), add a builder to
`tensor_rules`; reading, checking, stacking and writing follow from the table.

Both conversions stream piece by piece (`Piece`: one layer's or one
expert's tensor, or a block of about PIECE_BYTES of the embedding / output
head), so peak memory does not depend on the model's size: `hf_to_jax` reads
each piece from the safetensors files and writes it into its region of the
stored stacked parameter with tensorstore (each stored chunk is one piece);
`jax_to_hf` reads the parameters region by region and appends each tensor to
the safetensors shard being written. Every header is checked against the
config before anything is written, and all mismatches are reported in one
`ConversionError`. Outputs are written under a temporary name in the target's
parent directory and renamed at the end, so a failure leaves nothing behind.

A params checkpoint is a directory with `config.json` (`to_hf_config`, with
the source's other keys kept), an orbax checkpoint of the param pytree under
`params/`, and the source's tokenizer (and remote-code) files, if any.
`hf_to_jax` writes the orbax checkpoint without OCDBT (one zarr array per
parameter, chunked by piece; orbax writes the tree metadata);
`save_params_checkpoint` (the trainer's export) lets orbax write OCDBT.
Orbax restores both (`load_params_checkpoint`, sharded restores included)
and `jax_to_hf` reads both.

This module needs numpy, ml_dtypes, safetensors, tensorstore and orbax only
(no torch, no transformers, no Flax).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import functools
import json
import logging
import math
import os
import struct
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safe_open can read BF16)
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint import type_handlers
from safetensors import SafetensorError, safe_open

from sdar_jax.checkpoint.atomic import AtomicDir, check_output_dir
from sdar_jax.checkpoint.dtypes import numpy_dtype
from sdar_jax.checkpoint.errors import ConversionError, first_line
from sdar_jax.checkpoint.params import (
    CONFIG_FILE,
    PARAMS_SUBDIR,
    StoredParams,
    check_param_shapes,
    copy_aux_files,
    read_stored_params,
    write_config,
)
from sdar_jax.checkpoint.tree import get_path, set_path
from sdar_jax.config import ModelConfig, from_hf_config, read_hf_config_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tensors some checkpoints carry that hold no parameters (recomputed buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# safetensors dtype codes accepted as input, and the numpy dtypes we write.
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
_SAFETENSORS_CODES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# The largest block of an unstacked tensor (embedding, head) converted at once.
PIECE_BYTES = 64 * 1024**2
# Bytes converted between two returns of freed heap memory to the OS (_FreedMemory).
_TRIM_BYTES = 16 * 1024**2
# Pieces whose tensorstore write may still be running while the next is read.
_WRITES_IN_FLIGHT = 2


class ExportWarning(UserWarning):
    """An exported checkpoint that engines reading the release's format will misread."""


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


class _FreedMemory:
    """Hands freed heap memory back to the OS every _TRIM_BYTES converted.

    tensorstore copies each piece on its own threads, and glibc keeps what
    those threads free in per-thread arenas: without trimming, the process's
    resident size creeps up with the number of pieces (measured: +130 MB
    over 27 small layers) although nothing is live.
    """

    def __init__(self) -> None:
        self._since = 0

    def add(self, nbytes: int) -> None:
        self._since += nbytes
        trim = _malloc_trim()
        if self._since >= _TRIM_BYTES and trim is not None:
            trim(0)
            self._since = 0


# ---------------------------------------------------------------------------
# The rule table


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One family of Hugging Face tensors and the sdar_jax parameter it fills.

    Attributes:
      hf_name: the tensor name, with `{layer}` / `{expert}` placeholders for
        tensors stacked over layers / experts.
      path: the parameter's path in the sdar_jax param tree.
      hf_shape: the shape of one Hugging Face tensor.
      param_shape: the shape of one slice of the parameter (without the
        stacked axes).
      transpose: True for linear weights (`[out, in]` in Hugging Face): the
        tensor is transposed before it is reshaped to `param_shape`.
    """

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    param_shape: tuple[int, ...]
    transpose: bool = False

    def __post_init__(self) -> None:
        if math.prod(self.hf_shape) != math.prod(self.param_shape):
            raise ValueError(f"rule {self.hf_name}: {self.hf_shape} and {self.param_shape} differ in size")

    def stack_axes(self, config: ModelConfig) -> tuple[tuple[str, int], ...]:
        """The stacked axes (placeholder, length), outermost first."""
        axes = []
        if "{layer}" in self.hf_name:
            axes.append(("layer", config.num_layers))
        if "{expert}" in self.hf_name:
            axes.append(("expert", config.num_experts))
        return tuple(axes)

    def full_shape(self, config: ModelConfig) -> tuple[int, ...]:
        """The shape of the whole (stacked) parameter."""
        return tuple(n for _, n in self.stack_axes(config)) + self.param_shape

    def instances(self, config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Yields (tensor name, index into the stacked parameter) for every tensor."""
        axes = self.stack_axes(config)
        for index in np.ndindex(*(n for _, n in axes)):
            names = {axis: i for (axis, _), i in zip(axes, index)}
            yield self.hf_name.format(**names), tuple(int(i) for i in index)

    def to_param(self, tensor: np.ndarray) -> np.ndarray:
        """One Hugging Face tensor [hf_shape] -> one parameter slice [param_shape]."""
        return (tensor.T if self.transpose else tensor).reshape(self.param_shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        """One parameter slice [param_shape] -> one Hugging Face tensor [hf_shape]."""
        if self.transpose:
            return value.reshape(self.hf_shape[::-1]).T
        return value.reshape(self.hf_shape)

    def row_block(self, config: ModelConfig, itemsize: int) -> int | None:
        """Rows of the Hugging Face tensor converted at a time: a block of
        about PIECE_BYTES for an unstacked 2-D tensor that is larger (the
        embedding, the output head), None where the whole tensor is one piece
        (a stacked parameter's slice: one layer, one expert)."""
        if self.stack_axes(config) or len(self.hf_shape) != 2:
            return None
        if self.param_shape != (self.hf_shape[::-1] if self.transpose else self.hf_shape):
            return None
        rows = max(1, PIECE_BYTES // (self.hf_shape[1] * itemsize))
        return rows if rows < self.hf_shape[0] else None

    def pieces(self, config: ModelConfig, itemsize: int) -> Iterator["Piece"]:
        """Every region converted on its own, in file order."""
        block = self.row_block(config, itemsize)
        for name, index in self.instances(config):
            if block is None:
                yield Piece(name, self, index, None)
                continue
            for start in range(0, self.hf_shape[0], block):
                yield Piece(name, self, index, slice(start, min(start + block, self.hf_shape[0])))

    def chunk_shape(self, config: ModelConfig, itemsize: int) -> tuple[int, ...]:
        """The stored parameter's chunk: exactly one piece, so each piece is
        written without reading back (and read without reading more)."""
        block = self.row_block(config, itemsize)
        if block is not None:
            return (self.hf_shape[1], block) if self.transpose else (block, self.hf_shape[1])
        return (1,) * len(self.stack_axes(config)) + self.param_shape


@dataclasses.dataclass(frozen=True)
class Piece:
    """One region converted at a time: a whole Hugging Face tensor (a slice
    of a stacked parameter at `index`), or the rows `rows` of an unstacked
    2-D one (columns of the parameter when the rule transposes)."""

    name: str
    rule: TensorRule
    index: tuple[int, ...]
    rows: slice | None

    def param_region(self) -> tuple:
        """The index expression of this piece in the parameter."""
        if self.rows is None:
            return self.index
        return (slice(None), self.rows) if self.rule.transpose else (self.rows,)

    def to_param(self, tensor: np.ndarray) -> np.ndarray:
        """The Hugging Face region -> the parameter region."""
        if self.rows is None:
            return self.rule.to_param(tensor)
        return tensor.T if self.rule.transpose else tensor

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        """The parameter region -> the Hugging Face region."""
        if self.rows is None:
            return self.rule.to_hf(value)
        return value.T if self.rule.transpose else value


def _linear(hf_name: str, path: tuple[str, ...], out_shape: tuple[int, ...],
            in_shape: tuple[int, ...]) -> TensorRule:
    """An HF Linear weight [prod(out), prod(in)] -> kernel [*in, *out]."""
    return TensorRule(
        hf_name, path + ("kernel",), (math.prod(out_shape), math.prod(in_shape)),
        in_shape + out_shape, transpose=True,
    )


def _norm(hf_name: str, path: tuple[str, ...], size: int) -> TensorRule:
    return TensorRule(hf_name, path + ("scale",), (size,), (size,))


def _embedding_rules(cfg: ModelConfig) -> list[TensorRule]:
    shape = (cfg.vocab_size, cfg.hidden_size)
    rules = [
        TensorRule("model.embed_tokens.weight", ("embed_tokens", "embedding"), shape, shape),
        _norm("model.norm.weight", ("norm",), cfg.hidden_size),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(_linear("lm_head.weight", ("lm_head",), (cfg.vocab_size,), (cfg.hidden_size,)))
    return rules


def _attention_rules(cfg: ModelConfig) -> list[TensorRule]:
    pre, path = "model.layers.{layer}.", ("layers", "self_attn")
    hidden, d = (cfg.hidden_size,), cfg.head_dim
    rules = [
        _norm(pre + "input_layernorm.weight", ("layers", "input_layernorm"), cfg.hidden_size),
        _norm(pre + "post_attention_layernorm.weight", ("layers", "post_attention_layernorm"),
              cfg.hidden_size),
        _linear(pre + "self_attn.q_proj.weight", path + ("q_proj",), (cfg.num_heads, d), hidden),
        _linear(pre + "self_attn.k_proj.weight", path + ("k_proj",), (cfg.num_kv_heads, d), hidden),
        _linear(pre + "self_attn.v_proj.weight", path + ("v_proj",), (cfg.num_kv_heads, d), hidden),
        _linear(pre + "self_attn.o_proj.weight", path + ("o_proj",), hidden, (cfg.num_heads, d)),
    ]
    if cfg.qk_norm:
        rules += [
            _norm(pre + "self_attn.q_norm.weight", path + ("q_norm",), d),
            _norm(pre + "self_attn.k_norm.weight", path + ("k_norm",), d),
        ]
    return rules


def _dense_mlp_rules(cfg: ModelConfig) -> list[TensorRule]:
    pre, path = "model.layers.{layer}.mlp.", ("layers", "mlp")
    hidden, mlp = (cfg.hidden_size,), (cfg.intermediate_size,)
    return [
        _linear(pre + "gate_proj.weight", path + ("gate_proj",), mlp, hidden),
        _linear(pre + "up_proj.weight", path + ("up_proj",), mlp, hidden),
        _linear(pre + "down_proj.weight", path + ("down_proj",), hidden, mlp),
    ]


def _moe_mlp_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Qwen3-MoE as saved on disk: a router `mlp.gate` [experts, hidden] and
    per-expert SwiGLU weights (transformers 5 fuses them only in memory)."""
    pre, path = "model.layers.{layer}.mlp.", ("layers", "mlp")
    hidden, mlp = (cfg.hidden_size,), (cfg.moe_intermediate_size,)
    expert = pre + "experts.{expert}."
    return [
        _linear(pre + "gate.weight", path + ("router",), (cfg.num_experts,), hidden),
        _linear(expert + "gate_proj.weight", path + ("gate_proj",), mlp, hidden),
        _linear(expert + "up_proj.weight", path + ("up_proj",), mlp, hidden),
        _linear(expert + "down_proj.weight", path + ("down_proj",), hidden, mlp),
    ]


def tensor_rules(config: ModelConfig) -> tuple[TensorRule, ...]:
    """Every tensor of a Hugging Face checkpoint of `config`, as rules.

    Param tree: embed_tokens/embedding [vocab, hidden]; norm/scale [hidden];
    lm_head/kernel [hidden, vocab] (untied only); layers/... stacked on a
    leading [layers] axis: {input,post_attention}_layernorm/scale [L, hidden],
    self_attn/q_proj/kernel [L, hidden, heads, head_dim], k_proj, v_proj
    [L, hidden, kv_heads, head_dim], o_proj [L, heads, head_dim, hidden],
    q_norm, k_norm /scale [L, head_dim] (qk_norm only); dense mlp/{gate,up}_proj
    [L, hidden, mlp], down_proj [L, mlp, hidden]; MoE mlp/router/kernel
    [L, hidden, experts], mlp/{gate,up}_proj [L, experts, hidden, moe_mlp],
    down_proj [L, experts, moe_mlp, hidden].
    """
    mlp = _moe_mlp_rules(config) if config.is_moe else _dense_mlp_rules(config)
    rules = tuple(_embedding_rules(config) + _attention_rules(config) + mlp)
    paths = [r.path for r in rules]
    if len(set(paths)) != len(paths):
        raise ValueError(f"tensor_rules: two rules fill the same parameter in {paths}")
    return rules


def param_shapes(config: ModelConfig) -> dict:
    """The param tree of `config` with shape tuples as leaves (from the rules)."""
    tree: dict = {}
    for rule in tensor_rules(config):
        set_path(tree, rule.path, rule.full_shape(config))
    return tree


# ---------------------------------------------------------------------------
# Reading a Hugging Face directory


def _pickle_message(path: str) -> str:
    return (
        f"{path}: PyTorch pickle checkpoints (.bin/.pt/.pth/.ckpt) are refused: unpickling can run "
        "arbitrary code and cannot be streamed. Convert it to safetensors first, e.g. "
        "`transformers.AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
        "safe_serialization=True)` in a trusted environment, or download the model's "
        "*.safetensors files."
    )


@contextlib.contextmanager
def _open_safetensors(path: str) -> Iterator[Any]:
    """safe_open, with a truncated, empty or garbage file reported by name."""
    try:
        handle = safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    with handle as f:
        yield f


_SAFETENSORS_NUMPY = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


class _SafetensorsReader:
    """Reads tensors, or row blocks of them, from safetensors files with plain
    reads at the offsets their headers give.

    The safetensors library reads through a memory map, whose pages count as
    resident until the file is closed: a 5 GB shard read tensor by tensor
    would end up all resident. Files are validated with the library first
    (`_read_headers`); here each read allocates only the block it returns.
    """

    def __init__(self) -> None:
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}  # path -> (data start, header)

    def _header(self, path: str) -> tuple[int, dict[str, Any]]:
        if path not in self._headers:
            try:
                with open(path, "rb") as f:
                    (size,) = struct.unpack("<Q", f.read(8))
                    self._headers[path] = (8 + size, json.loads(f.read(size)))
            except (OSError, struct.error, ValueError) as e:
                raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
        return self._headers[path]

    def offset(self, path: str, name: str) -> int:
        """Where tensor `name`'s data starts in file `path` (to read files front to back)."""
        start, header = self._header(path)
        entry = header.get(name)
        return start + entry["data_offsets"][0] if isinstance(entry, dict) else 0

    def read(self, path: str, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor `name` of file `path` (rows `rows` of it, if given)."""
        start, header = self._header(path)
        entry = header.get(name)
        if entry is None or entry.get("dtype") not in _SAFETENSORS_NUMPY:
            raise ConversionError(f"{path}: no readable float tensor {name}")
        dtype, shape = _SAFETENSORS_NUMPY[entry["dtype"]], tuple(entry["shape"])
        row_items = math.prod(shape[1:])
        first, stop = (0, shape[0] if shape else 1) if rows is None else (rows.start, rows.stop)
        count = (stop - first) * row_items
        with open(path, "rb") as f:
            f.seek(start + entry["data_offsets"][0] + first * row_items * dtype.itemsize)
            data = np.fromfile(f, dtype=dtype, count=count)
        if data.size != count:
            raise ConversionError(f"{path}: tensor {name} is cut short (the file is truncated)")
        return data.reshape(shape if rows is None else (stop - first,) + shape[1:])

    def __enter__(self) -> "_SafetensorsReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._headers.clear()


def find_safetensors(hf_dir: str | os.PathLike) -> dict[str, str]:
    """Maps every tensor name to the safetensors file holding it.

    Reads `model.safetensors.index.json` when present, else every
    `*.safetensors` file in the directory.

    Raises:
      ConversionError: the directory or a listed shard is missing, only pickle
        files are present, a file is not readable safetensors, or a tensor
        appears in two files.
    """
    hf_dir = os.fspath(hf_dir)
    if os.path.isfile(hf_dir) and hf_dir.endswith(PICKLE_SUFFIXES):
        raise ConversionError(_pickle_message(hf_dir))
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir}: not a directory (expected a Hugging Face model directory)")
    entries = sorted(os.listdir(hf_dir))
    index_path = os.path.join(hf_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            located = {str(name): os.path.join(hf_dir, file) for name, file in weight_map.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"{index_path}: not a safetensors index ({e!r})") from e
        missing = sorted({os.path.basename(f) for f in located.values() if not os.path.isfile(f)})
        if missing:
            raise ConversionError(f"{index_path}: lists shard files that do not exist: {missing}")
        return located
    files = [e for e in entries if e.endswith(".safetensors")]
    if not files:
        pickles = [e for e in entries if e.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ConversionError(_pickle_message(os.path.join(hf_dir, pickles[0])))
        raise ConversionError(f"{hf_dir}: no *.safetensors files and no {SAFETENSORS_INDEX}")
    located: dict[str, str] = {}
    for file in files:
        path = os.path.join(hf_dir, file)
        with _open_safetensors(path) as f:
            for name in f.keys():
                if name in located:
                    raise ConversionError(f"tensor {name!r} appears in both {located[name]} and {path}")
                located[name] = path
    return located


@dataclasses.dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, ...


def _read_headers(located: Mapping[str, str]) -> dict[str, _Header]:
    headers: dict[str, _Header] = {}
    by_file: dict[str, list[str]] = {}
    for name, path in located.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with _open_safetensors(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ConversionError(f"{path}: the index lists tensor {name!r}, the file lacks it")
                sl = f.get_slice(name)
                headers[name] = _Header(tuple(sl.get_shape()), sl.get_dtype())
    return headers


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


def _default_dtype(headers: Mapping[str, _Header]) -> str:
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
        for name, pieces in _hf_pieces(self.config, self.config.param_dtype).items():
            by_file.setdefault(self.located[name], []).extend(pieces)
        return sorted(by_file.items())


def _check_source(hf_dir: str | os.PathLike, dtype: str | None) -> _Source:
    """Reads config.json and every tensor header and checks them (no tensor data is read)."""
    hf_dir = os.fspath(hf_dir)
    located = find_safetensors(hf_dir)
    config_path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ConversionError(f"{hf_dir}: no {CONFIG_FILE}")
    headers = _read_headers(located)
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


def _check_tied_head(source: _Source, reader: _SafetensorsReader) -> None:
    """A tied config with a stored lm_head.weight: it must equal the embedding
    (compared block by block, in the output dtype)."""
    config, located = source.config, source.located
    if not config.tie_word_embeddings or "lm_head.weight" not in located:
        return
    out_dtype = numpy_dtype(config.param_dtype)
    embed = "model.embed_tokens.weight"
    rows = max(1, PIECE_BYTES // (config.hidden_size * out_dtype.itemsize))
    for start in range(0, config.vocab_size, rows):
        block = slice(start, min(start + rows, config.vocab_size))
        head = reader.read(located["lm_head.weight"], "lm_head.weight", block).astype(out_dtype)
        if not np.array_equal(head, reader.read(located[embed], embed, block).astype(out_dtype)):
            raise ConversionError(
                f"{source.hf_dir}: config ties the embeddings but lm_head.weight differs from "
                f"{embed} (rows {block.start}-{block.stop - 1})"
            )


def _convert_pieces(
    source: _Source, reader: _SafetensorsReader, write: Callable[[Piece, np.ndarray], None],
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

    with _SafetensorsReader() as reader:
        _check_tied_head(source, reader)
        _convert_pieces(source, reader, write)
    return config, params


# ---------------------------------------------------------------------------
# Writing a Hugging Face directory


def _plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _safetensors_header(names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype) -> bytes:
    """The 8-byte length and the JSON header of a file holding `names` in
    that order (padded with spaces to 8 bytes, as the safetensors library does)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        size = math.prod(shapes[name]) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_CODES[dtype], "shape": list(shapes[name]),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def _row_blocks(value: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if hasattr(value, "shape"):
        yield np.asarray(value)
    else:
        for block in value:
            yield np.asarray(block)


def write_safetensors(
    out_dir: str,
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray | Iterable[np.ndarray]],
    dtype: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes tensors as Hugging Face safetensors into an existing directory.

    One `model.safetensors` when everything fits in `max_shard_bytes`, else
    `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`.
    Each file's header is written first (every shape is known), then each
    tensor is produced and appended in turn: peak extra memory is one
    tensor, or one row block of it.

    Args:
      out_dir: the directory to write into.
      tensors: (name, shape) of every tensor, in file order.
      produce: name -> the tensor's values (any float dtype, that shape), or
        an iterable of consecutive row blocks [rows_i, *shape[1:]] whose rows
        add up to shape[0].
      dtype: "float32" or "bfloat16", the dtype written.
      max_shard_bytes: the largest shard (a larger single tensor gets its own).
    """
    out_dtype = numpy_dtype(dtype)
    shapes = {name: tuple(int(n) for n in shape) for name, shape in tensors}
    sizes = [(name, math.prod(shape) * out_dtype.itemsize) for name, shape in shapes.items()]
    shards = _plan_shards(sizes, max_shard_bytes)
    file_names = (
        [SAFETENSORS_SINGLE] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file_name, names in zip(file_names, shards):
        with open(os.path.join(out_dir, file_name), "wb") as f:
            f.write(_safetensors_header(names, shapes, out_dtype))
            for name in names:
                _append_tensor(f, name, shapes[name], produce(name), out_dtype)
                weight_map[name] = file_name
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


def _append_tensor(f: Any, name: str, shape: tuple[int, ...], value: Any, dtype: np.dtype) -> None:
    """Writes `value` (an array, or row blocks) at the end of `f`, checking it is `shape`."""
    rows = 0
    for block in _row_blocks(value):
        if rows == 0 and tuple(block.shape) == shape:
            rows = shape[0] if shape else 1
        elif (not shape or block.ndim != len(shape) or tuple(block.shape[1:]) != shape[1:]
              or rows + block.shape[0] > shape[0]):
            raise ConversionError(f"tensor {name} has shape {list(block.shape)}, expected {list(shape)}")
        else:
            rows += block.shape[0]
        np.ascontiguousarray(block.astype(dtype, copy=False)).tofile(f)
    if rows != (shape[0] if shape else 1):
        raise ConversionError(f"tensor {name}: got {rows} rows, expected {shape[0]}")


def _hf_pieces(config: ModelConfig, dtype: str) -> dict[str, list[Piece]]:
    """Hugging Face tensor name -> its pieces, in file order."""
    itemsize = numpy_dtype(dtype).itemsize
    pieces: dict[str, list[Piece]] = {}
    for rule in tensor_rules(config):
        for piece in rule.pieces(config, itemsize):
            pieces.setdefault(piece.name, []).append(piece)
    return pieces


def _write_hf_pieces(
    out_dir: str, config: ModelConfig, read: Callable[[Piece], np.ndarray], dtype: str,
    max_shard_bytes: int,
) -> None:
    """Writes the safetensors of `config`, each piece's values from `read`
    (the parameter region `piece.param_region()`)."""
    pieces = _hf_pieces(config, dtype)

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


# ---------------------------------------------------------------------------
# Output directories


# ---------------------------------------------------------------------------
# Params checkpoints (orbax)


def _open_param_stores(stored: StoredParams) -> dict[tuple[str, ...], Any]:
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


def _create_param_stores(params_dir: str, config: ModelConfig) -> dict[tuple[str, ...], Any]:
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


# ---------------------------------------------------------------------------
# The two conversions


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
    with _SafetensorsReader() as reader:
        _check_tied_head(source, reader)
        with AtomicDir(out_dir, overwrite, sources=(hf_dir,)) as tmp:
            write_config(tmp, source.config, base=source.hf_config)
            stores = _create_param_stores(os.path.join(tmp, PARAMS_SUBDIR), source.config)
            pending: collections.deque = collections.deque()
            freed = _FreedMemory()

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


def _shifted_warning(config: ModelConfig) -> str:
    return (
        f"the model reads the token at position j from the output at j - 1 (logits_convention="
        f"{config.logits_convention!r}, written to config.json); the SDAR release's modeling code "
        "and engines that follow it read it from the output at j and cannot decode this model"
    )


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
    with `logits_convention="shifted"` is exported with that key and an
    `ExportWarning`: the release's code cannot decode it.

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
    stores = _open_param_stores(stored)
    freed = _FreedMemory()

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

    if config.logits_convention == "shifted":
        warnings.warn(_shifted_warning(config), ExportWarning, stacklevel=2)
    with AtomicDir(out_dir, overwrite, sources=(ckpt_dir,)) as tmp:
        _write_hf_pieces(tmp, config, read, dtype, max_shard_bytes)
        write_config(tmp, config, base=stored.hf_config)
        copy_aux_files(ckpt_dir, tmp, stored.hf_config)
    return config
