"""Safetensors files on disk: finding a directory's tensors, reading headers and blocks, writing shards.

Reading: `find_safetensors` maps every tensor of a Hugging Face directory
(`model.safetensors.index.json`, else every `*.safetensors` file) to its file,
refusing PyTorch pickles; `read_headers` validates the files with the
safetensors library and returns each tensor's shape and dtype code;
`SafetensorsReader` then reads tensors, or row blocks of them, with plain
reads at the offsets the headers give (no memory map).

Writing: `write_safetensors` writes `model.safetensors`, or shards plus an
index, header first and then each tensor (or row block) as it is produced.
Every problem is a `ConversionError` naming the file or tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import struct
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from sdar_jax.checkpoint.dtypes import numpy_dtype
from sdar_jax.checkpoint.errors import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors dtype codes accepted as input, and the numpy dtypes we write.
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
_SAFETENSORS_CODES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


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


class SafetensorsReader:
    """Reads tensors, or row blocks of them, from safetensors files with plain
    reads at the offsets their headers give.

    The safetensors library reads through a memory map, whose pages count as
    resident until the file is closed: a 5 GB shard read tensor by tensor
    would end up all resident. Files are validated with the library first
    (`read_headers`); here each read allocates only the block it returns.
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

    def __enter__(self) -> "SafetensorsReader":
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
class TensorHeader:
    """One tensor's shape and safetensors dtype code, from its file's header."""

    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, ...


def read_headers(located: Mapping[str, str]) -> dict[str, TensorHeader]:
    """The header of every tensor of `located` (name -> file), read with the
    safetensors library (a file it cannot read is refused by name)."""
    headers: dict[str, TensorHeader] = {}
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
                headers[name] = TensorHeader(tuple(sl.get_shape()), sl.get_dtype())
    return headers


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
