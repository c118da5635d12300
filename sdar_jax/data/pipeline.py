"""The grain input pipeline: records -> tokenised examples -> packed rows -> batches.

One call builds each iterator the trainer needs:

  make_train_iterator(data_config, tokenizer, block_size, seq_len, global_batch, seed)
  make_eval_iterator(data_config, tokenizer, block_size, seq_len, global_batch)

Both return a grain `DatasetIterator` of this process's batches, dicts of
numpy arrays `tokens`, `segment_ids`, `positions` [batch, seq_len] int32 and
`loss_mask` [batch, seq_len] bool (the shared batch contract), with
batch = global_batch / jax.process_count(). Its `get_state()` is a small
JSON-able dict and `set_state(state)` resumes exactly there, so the trainer
stores it in its checkpoint.

Stages (per process):
  1. a record source (`sources.open_source`: JSONL, `.npy` shards, ArrayRecord);
  2. this process's records: every `process_count`-th record from
     `process_index` (training drops the last few records so that every process
     has the same number);
  3. training: a global shuffle per epoch (seeded; reshuffled every epoch)
     and repetition (`num_epochs`, None = forever);
  4. records become examples (`RecordToExample`):
       text              encode(text) (+ `<|endoftext|>` if append_eos), all trained;
       prompt/response   the chat template's user turn with the generation
                         prompt (loss_mask False), then encode(response) +
                         `<|im_end|>` (loss_mask True);
       tokens            as given, loss_mask as given or all True;
  5. each example is padded with `<|endoftext|>` to a multiple of the block
     size (trained) and checked against seq_len (raise, or split:
     `long_examples`), `packing.BlockPadAndFit`;
  6. first-fit packing into rows of seq_len (`packing.pack`), then batching.
Everything is deterministic for a seed.

Malformed training records (invalid JSON, missing or mistyped fields, bad
ids) follow `on_bad_record`: "error" (default) raises `DataSourceError`
naming the file and line when the record is reached; "skip" drops the record,
logs a warning naming it (the first `BadRecordCounter.max_logged`) and counts
it in the `BadRecordCounter` passed to `make_train_iterator`. Skipping is
deterministic (the same records are dropped on every pass and after a
resume); it needs `worker_count=0`, so the count lives in the trainer's
process. Eval data always raise.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from typing import Any, Mapping

import grain
import jax
import numpy as np

from sdar_jax.data import packing, sources
from sdar_jax.data.tokenizer import Tokenizer

EOS_TOKEN = "<|endoftext|>"
IM_END_TOKEN = "<|im_end|>"
# Keys of a run config's `data` section that the trainer reads itself (passed
# to the constructors as arguments) and that DataConfig therefore accepts and ignores.
TRAINER_KEYS = frozenset({"seq_len", "global_batch_size", "seed", "tokenizer_dir"})
BAD_RECORD_POLICIES = ("error", "skip")

_log = logging.getLogger(__name__)


class DataConfigError(ValueError):
    """A data-config field is missing or has a bad value."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input-pipeline settings.

    Attributes:
      train_path, eval_path: files, globs, directories or comma-separated lists
        of them (see `sources.expand_paths`).
      long_examples: "raise" (default) or "split" for examples longer than seq_len.
      on_bad_record: "error" (default) or "skip" for malformed training records
        (see the module docstring).
      append_eos: end every `text` record with `<|endoftext|>`.
      shuffle: shuffle the training records (per epoch) and packed rows.
      num_epochs: training epochs over the records; None (the default, and the
        right choice with several processes, whose packed streams differ in
        length) repeats forever and the trainer's step count ends the run.
      packing_bins: rows the first-fit packer fills at once; None = the
        per-process batch size.
      worker_count: grain worker processes (0: everything in this process).
        Each worker packs and batches its own slice of the records, so the
        stream depends on worker_count; resume with the same value.
      read_threads: threads reading and tokenising records.
    """

    train_path: str | None = None
    eval_path: str | None = None
    long_examples: packing.LongExamples = "raise"
    on_bad_record: str = "error"
    append_eos: bool = True
    shuffle: bool = True
    num_epochs: int | None = None
    packing_bins: int | None = None
    worker_count: int = 0
    read_threads: int = 4

    def __post_init__(self) -> None:
        if self.long_examples not in packing.LONG_EXAMPLE_POLICIES:
            raise DataConfigError(
                f"data.long_examples is {self.long_examples!r}; expected one of "
                f"{packing.LONG_EXAMPLE_POLICIES}")
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise DataConfigError(
                f"data.on_bad_record is {self.on_bad_record!r}; expected one of {BAD_RECORD_POLICIES}")
        if self.on_bad_record == "skip" and self.worker_count:
            raise DataConfigError(
                "data.on_bad_record='skip' counts skipped records in the trainer's process; set "
                f"data.worker_count=0 (got {self.worker_count})")
        for name in ("num_epochs", "packing_bins"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataConfigError(f"data.{name} must be positive or None, got {value}")
        if self.worker_count < 0 or self.read_threads < 1:
            raise DataConfigError(
                f"data.worker_count must be >= 0 and data.read_threads >= 1, got "
                f"{self.worker_count} and {self.read_threads}")

    @classmethod
    def from_config(cls, config: "DataConfig | Mapping[str, Any] | Any") -> "DataConfig":
        """From a DataConfig, a dict, or an ml_collections ConfigDict (a run's `data` section).

        Keys in TRAINER_KEYS are ignored; any other unknown key raises.
        """
        if isinstance(config, DataConfig):
            return config
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields - TRAINER_KEYS)
        if unknown:
            raise DataConfigError(f"unknown data config fields {unknown}; known: {sorted(fields)}")
        return cls(**{k: v for k, v in values.items() if k in fields})


def _as_ids(values: Any, origin: str, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise sources.DataSourceError(
            f"{origin}: {name!r} must be a flat list of integers, got shape {array.shape} "
            f"dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
        raise sources.DataSourceError(f"{origin}: {name!r} holds ids outside [0, 2**31)")
    return array.astype(np.int32)


class RecordToExample(grain.transforms.Map):
    """A record dict (see `sources`) -> {"tokens": [n] int32, "loss_mask": [n] bool}.

    Pickles as its tokenizer's directory (grain workers reload the tokenizer:
    a compiled chat template does not pickle).
    """

    def __init__(self, tokenizer: Tokenizer, append_eos: bool = True):
        self.tokenizer = tokenizer
        self.append_eos = append_eos
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.tokenizer.directory, "append_eos": self.append_eos}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(Tokenizer.from_dir(state["directory"]), state["append_eos"])

    def _text(self, text: str) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(text) + ([self.eos_id] if self.append_eos else [])
        return {"tokens": np.asarray(ids, np.int32), "loss_mask": np.ones(len(ids), bool)}

    def _chat(self, prompt: str, response: str) -> dict[str, np.ndarray]:
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = self.tokenizer.encode(rendered)
        answer_ids = self.tokenizer.encode(response) + [self.tokenizer.token_to_id(IM_END_TOKEN)]
        return {
            "tokens": np.asarray(prompt_ids + answer_ids, np.int32),
            "loss_mask": np.concatenate([np.zeros(len(prompt_ids), bool),
                                         np.ones(len(answer_ids), bool)]),
        }

    def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
        origin = str(record.get("_origin", "a record"))
        if "tokens" in record:
            tokens = _as_ids(record["tokens"], origin, "tokens")
            if "loss_mask" in record:
                loss_mask = np.asarray(record["loss_mask"]).astype(bool)
                if loss_mask.shape != tokens.shape:
                    raise sources.DataSourceError(
                        f"{origin}: loss_mask has {loss_mask.size} entries, tokens {tokens.size}")
            else:
                loss_mask = np.ones(tokens.shape, bool)
            example = {"tokens": tokens, "loss_mask": loss_mask}
        elif "prompt" in record or "response" in record:
            prompt, response = record.get("prompt"), record.get("response")
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise sources.DataSourceError(
                    f"{origin}: an SFT record needs string 'prompt' and 'response' fields, got "
                    f"{type(prompt).__name__} and {type(response).__name__}")
            example = self._chat(prompt, response)
        elif "text" in record:
            if not isinstance(record["text"], str):
                raise sources.DataSourceError(
                    f"{origin}: 'text' must be a string, got {type(record['text']).__name__}")
            example = self._text(record["text"])
        else:
            keys = sorted(k for k in record if k != "_origin")
            raise sources.DataSourceError(
                f"{origin}: record has fields {keys}; expected 'text', 'prompt'+'response' "
                f"or 'tokens'")
        example["_origin"] = origin
        return example


class BadRecordCounter:
    """Counts the malformed records the "skip" policy dropped (thread-safe) and logs
    the first `max_logged` of them, naming each."""

    def __init__(self, max_logged: int = 10):
        self.max_logged = max_logged
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    def add(self, error: sources.DataSourceError) -> None:
        with self._lock:
            self._count += 1
            count = self._count
        if count <= self.max_logged:
            _log.warning("skipping malformed training record (data.on_bad_record='skip'): %s", error)
        if count == self.max_logged:
            _log.warning("further malformed records are skipped and counted without a message")


class _SkipBadRecords(grain.MapDataset):
    """`parent.map(to_example)`, with records that raise DataSourceError (while read
    or converted) dropped and counted."""

    def __init__(self, parent: grain.MapDataset, to_example: "RecordToExample", counter: BadRecordCounter):
        super().__init__(parent)
        self._to_example = to_example
        self._counter = counter

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        try:
            return self._to_example.map(self._parent[index])
        except sources.DataSourceError as e:
            self._counter.add(e)
            return None  # grain's iterators pass over None elements

    def __str__(self) -> str:
        return "_SkipBadRecords"


def _load_tokenizer(tokenizer: Tokenizer | str | os.PathLike[str]) -> Tokenizer:
    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_dir(tokenizer)


def _shard(ds: grain.MapDataset, shard: tuple[int, int] | None, drop_remainder: bool) -> grain.MapDataset:
    """Every count-th record from index (process index and count by default)."""
    index, count = shard if shard is not None else (jax.process_index(), jax.process_count())
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside [0, {count})")
    if drop_remainder:
        keep = len(ds) // count * count
        if keep == 0:
            raise DataConfigError(
                f"the data has {len(ds)} records, fewer than the {count} processes reading it")
        ds = ds[:keep]
    return ds[index::count]


def _per_process_batch(global_batch: int, shard: tuple[int, int] | None) -> int:
    count = shard[1] if shard is not None else jax.process_count()
    if global_batch < 1 or global_batch % count:
        raise DataConfigError(
            f"global batch size {global_batch} must be a positive multiple of the process "
            f"count {count}")
    return global_batch // count


def _records_to_rows(
    ds: grain.MapDataset, cfg: DataConfig, tokenizer: Tokenizer, *, block_size: int,
    seq_len: int, batch: int, seed: int, shuffle_rows: bool,
    bad_records: BadRecordCounter | None = None,
) -> grain.IterDataset:
    """Stages 4-6 of the module docstring: records -> packed rows (not yet batched).
    With `bad_records`, malformed records are skipped and counted there."""
    to_example = RecordToExample(tokenizer, cfg.append_eos)
    ds = ds.map(to_example) if bad_records is None else _SkipBadRecords(ds, to_example, bad_records)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=4 * batch))
    it = grain.experimental.FlatMapIterDataset(
        it, packing.BlockPadAndFit(block_size, seq_len, tokenizer.token_to_id(EOS_TOKEN),
                                   cfg.long_examples))
    return packing.pack(it, seq_len, cfg.packing_bins or batch, seed=seed, shuffle_bins=shuffle_rows)


def _with_workers(ds: grain.IterDataset, cfg: DataConfig) -> grain.IterDataset:
    if cfg.worker_count == 0:
        return ds
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))


def make_train_iterator(
    data_config: DataConfig | Mapping[str, Any] | Any,
    tokenizer: Tokenizer | str | os.PathLike[str],
    block_size: int,
    seq_len: int,
    global_batch: int,
    seed: int,
    *,
    shard: tuple[int, int] | None = None,
    bad_records: BadRecordCounter | None = None,
) -> grain.DatasetIterator:
    """The training iterator of this process (shuffled, repeated, packed, batched).

    Args:
      data_config: DataConfig, or a dict / ConfigDict with its fields
        (`train_path` required).
      tokenizer: a Tokenizer or its directory.
      block_size: B; examples are padded to multiples of it (1 for AR training).
      seq_len: packed row length, a multiple of block_size.
      global_batch: rows per step over all processes.
      seed: shuffling seed.
      shard: (index, count) to read instead of (jax.process_index(), jax.process_count()).
      bad_records: where the "skip" policy counts dropped records (a fresh
        counter when None; ignored under "error").

    Returns:
      A grain DatasetIterator of dicts with [global_batch / count, seq_len] arrays.
    """
    cfg = DataConfig.from_config(data_config)
    if cfg.on_bad_record == "skip" and bad_records is None:
        bad_records = BadRecordCounter()
    if cfg.on_bad_record == "error":
        bad_records = None
    if not cfg.train_path:
        raise DataConfigError("data.train_path is required to build the training iterator")
    tokenizer = _load_tokenizer(tokenizer)
    batch = _per_process_batch(global_batch, shard)
    ds = grain.MapDataset.source(sources.open_source(cfg.train_path, chunk_len=seq_len))
    ds = _shard(ds, shard, drop_remainder=True)
    if cfg.shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(cfg.num_epochs)
    rows = _records_to_rows(ds, cfg, tokenizer, block_size=block_size, seq_len=seq_len,
                            batch=batch, seed=seed, shuffle_rows=cfg.shuffle,
                            bad_records=bad_records)
    return iter(_with_workers(rows.batch(batch, drop_remainder=True), cfg))


def make_eval_iterator(
    data_config: DataConfig | Mapping[str, Any] | Any,
    tokenizer: Tokenizer | str | os.PathLike[str],
    block_size: int,
    seq_len: int,
    global_batch: int,
    *,
    num_batches: int | None = None,
    shard: tuple[int, int] | None = None,
) -> grain.DatasetIterator:
    """The held-out iterator of this process: no shuffling, same batches every time.

    With `num_batches=None` it makes one pass over this process's records (the
    last batch is filled up with all-padding rows, which carry no loss).
    Processes may then yield different numbers of batches; in a multi-process
    run pass `num_batches`: the records are then repeated as needed and every
    process yields exactly that many batches.

    Args: as `make_train_iterator` (`eval_path` required), plus num_batches.

    Returns:
      A grain DatasetIterator of dicts with [global_batch / count, seq_len] arrays.
    """
    cfg = DataConfig.from_config(data_config)
    if not cfg.eval_path:
        raise DataConfigError("data.eval_path is required to build the eval iterator")
    if num_batches is not None and num_batches < 1:
        raise DataConfigError(f"num_batches must be positive or None, got {num_batches}")
    tokenizer = _load_tokenizer(tokenizer)
    batch = _per_process_batch(global_batch, shard)
    ds = grain.MapDataset.source(sources.open_source(cfg.eval_path, chunk_len=seq_len))
    ds = _shard(ds, shard, drop_remainder=False)
    if num_batches is not None:
        ds = ds.repeat(None, reseed_each_epoch=False)
    rows = _records_to_rows(ds, cfg, tokenizer, block_size=block_size, seq_len=seq_len,
                            batch=batch, seed=0, shuffle_rows=False)
    batches = rows.batch(batch, drop_remainder=False).map(
        functools.partial(packing.pad_batch, batch_size=batch))
    if num_batches is not None:
        batches = grain.experimental.LimitIterDataset(batches, num_batches)
    return iter(_with_workers(batches, cfg))
