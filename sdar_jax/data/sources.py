"""Random-access record sources for grain: JSONL, numpy `.npy` shards, ArrayRecord.

Every source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`)
whose records are dicts in one of three schemas (see `sdar_jax.data.pipeline`
for how each becomes a training example):

  {"text": str}                             pretraining text (every token trained)
  {"prompt": str, "response": str}          SFT pair (prompt kept clean, no loss)
  {"tokens": [int, ...], "loss_mask": [bool, ...] (optional)}   pre-tokenised

Each record also carries `"_origin"` ("file:line" or "file#index") so that
errors downstream can name the offending input.

- JSONL (`.jsonl`, `.json`): one JSON object per non-empty line. The files
  are indexed once (byte offsets of each line) and read lazily.
- numpy (`.npy`, memory-mapped): a 2-D integer array `[num_examples, length]`
  holds one pre-tokenised example per row; a 1-D integer array is a token
  stream cut into consecutive records of `chunk_len` tokens (the last record
  holds the remainder). All tokens carry loss (pretraining data).
- ArrayRecord (`.array_record`): each record is one of the dicts above,
  JSON-encoded as UTF-8 (`write_array_record` writes such files), read with
  grain's `ArrayRecordDataSource`.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from sdar_jax.data import procedural

JSONL_SUFFIXES = (".jsonl", ".json")
NUMPY_SUFFIXES = (".npy",)
ARRAY_RECORD_SUFFIXES = (".array_record",)
FORMATS = ("jsonl", "numpy", "array_record")


class DataSourceError(ValueError):
    """A data file is missing, malformed or of an unknown format."""


def expand_paths(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Files named by `spec`: a path, a glob, a comma-separated list of them, or a sequence.

    Directories expand to the files they contain (sorted, non-recursive). The
    result keeps the given order, with each glob's matches sorted.
    """
    if isinstance(spec, (str, os.PathLike)):
        parts = [p.strip() for p in os.fspath(spec).split(",") if p.strip()]
    else:
        parts = [os.fspath(p) for p in spec]
    if not parts:
        raise DataSourceError(f"no data files given (got {spec!r})")
    files: list[str] = []
    for part in parts:
        if os.path.isdir(part):
            found = sorted(os.path.join(part, f) for f in os.listdir(part)
                           if os.path.isfile(os.path.join(part, f)))
        elif glob.has_magic(part):
            found = sorted(glob.glob(part))
        else:
            found = [part] if os.path.isfile(part) else []
        if not found:
            raise DataSourceError(f"data path {part!r} matches no file")
        files.extend(found)
    return files


def format_of(path: str) -> str:
    """The format of a file, from its suffix."""
    for fmt, suffixes in (("jsonl", JSONL_SUFFIXES), ("numpy", NUMPY_SUFFIXES),
                          ("array_record", ARRAY_RECORD_SUFFIXES)):
        if path.endswith(suffixes):
            return fmt
    raise DataSourceError(
        f"cannot tell the format of {path!r} from its suffix; expected one of "
        f"{JSONL_SUFFIXES + NUMPY_SUFFIXES + ARRAY_RECORD_SUFFIXES}")


class _Concatenated:
    """Index arithmetic over several files with known record counts."""

    def __init__(self, paths: Sequence[str], counts: Sequence[int]):
        self.paths = list(paths)
        self._ends = np.cumsum(counts, dtype=np.int64).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, index within that file) of a global record index."""
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range [0, {len(self)})")
        file = bisect.bisect_right(self._ends, index)
        return file, index - (self._ends[file - 1] if file else 0)


def _line_offsets(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers of the non-empty lines of a file."""
    offsets, lines = [], []
    with open(path, "rb") as f:
        offset = 0
        for number, line in enumerate(f, start=1):
            if line.strip():
                offsets.append(offset)
                lines.append(number)
            offset += len(line)
    return np.asarray(offsets, np.int64), np.asarray(lines, np.int64)


class JsonlSource:
    """Records from JSON-lines files (one object per non-empty line)."""

    def __init__(self, paths: Sequence[str]):
        self._offsets, self._lines = [], []
        for path in paths:
            offsets, lines = _line_offsets(path)
            self._offsets.append(offsets)
            self._lines.append(lines)
        self._files = _Concatenated(paths, [len(o) for o in self._offsets])

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        file, local = self._files.locate(int(index))
        path = self._files.paths[file]
        origin = f"{path}:{self._lines[file][local]}"
        with open(path, "rb") as f:
            f.seek(int(self._offsets[file][local]))
            line = f.readline()
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataSourceError(f"{origin}: invalid JSON ({e})") from e
        if not isinstance(record, dict):
            raise DataSourceError(f"{origin}: expected a JSON object, got {type(record).__name__}")
        record["_origin"] = origin
        return record

    def __repr__(self) -> str:
        return f"JsonlSource({len(self._files.paths)} files, {len(self)} records)"


class NumpySource:
    """Pre-tokenised examples from `.npy` shards (memory-mapped)."""

    def __init__(self, paths: Sequence[str], chunk_len: int):
        if chunk_len < 1:
            raise DataSourceError(f"NumpySource: chunk_len must be positive, got {chunk_len}")
        self._chunk_len = chunk_len
        self._paths = list(paths)
        self._arrays: list[np.ndarray] | None = None
        counts = []
        for path, array in zip(self._paths, self._load()):
            if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.integer):
                raise DataSourceError(
                    f"{path}: expected a 1-D token stream or a 2-D [examples, length] integer "
                    f"array, got shape {array.shape} dtype {array.dtype}")
            counts.append(len(array) if array.ndim == 2 else -(-len(array) // chunk_len))
        self._files = _Concatenated(self._paths, counts)

    def _load(self) -> list[np.ndarray]:
        if self._arrays is None:
            self._arrays = [np.load(p, mmap_mode="r", allow_pickle=False) for p in self._paths]
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are reopened in the receiving process (grain workers).
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        file, local = self._files.locate(int(index))
        array = self._load()[file]
        if array.ndim == 2:
            tokens = array[local]
        else:
            tokens = array[local * self._chunk_len:(local + 1) * self._chunk_len]
        return {"tokens": np.asarray(tokens, np.int32), "_origin": f"{self._paths[file]}#{local}"}

    def __repr__(self) -> str:
        return f"NumpySource({len(self._paths)} files, {len(self)} records)"


class ArrayRecordSource:
    """JSON-encoded dict records from ArrayRecord files (grain's ArrayRecordDataSource)."""

    def __init__(self, paths: Sequence[str]):
        import grain

        self._paths = list(paths)
        self._source = grain.sources.ArrayRecordDataSource(self._paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        origin = f"{','.join(self._paths)}#{int(index)}"
        try:
            record = json.loads(self._source[int(index)])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataSourceError(f"{origin}: record is not UTF-8 JSON ({e})") from e
        if not isinstance(record, dict):
            raise DataSourceError(f"{origin}: expected a JSON object, got {type(record).__name__}")
        record["_origin"] = origin
        return record

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self._paths)} files, {len(self)} records)"


def write_array_record(path: str, records: Iterable[dict[str, Any]]) -> int:
    """Writes dict records JSON-encoded into one ArrayRecord file; returns the count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    count = 0
    try:
        for record in records:
            writer.write(json.dumps(record).encode("utf-8"))
            count += 1
    finally:
        writer.close()
    return count


def open_source(spec: str | Sequence[str], chunk_len: int) -> Any:
    """The source for `spec` (see `expand_paths`); all files must share one format.

    `procedural:TASKS[@seed=S]` names the endless task stream instead
    (`sdar_jax.data.procedural`).

    Args:
      spec: paths, globs or directories.
      chunk_len: record length for 1-D numpy token streams (usually seq_len).
    """
    if procedural.is_spec(spec):
        return procedural.ProceduralTaskSource.from_spec(spec)
    paths = expand_paths(spec)
    formats = {format_of(p) for p in paths}
    if len(formats) != 1:
        raise DataSourceError(f"data files mix formats {sorted(formats)}: {paths}")
    fmt = formats.pop()
    if fmt == "jsonl":
        return JsonlSource(paths)
    if fmt == "numpy":
        return NumpySource(paths, chunk_len)
    return ArrayRecordSource(paths)
