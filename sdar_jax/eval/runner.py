"""Batched, jitted evaluation of a checkpoint on a JSONL file of problems.

The flow, host side around one jitted decoder call per batch:

1. `load_examples`: problems with a `prompt` and a reference `answer` (other
   fields such as `task` are carried into the outputs).
2. `encode_prompts`: token ids, optionally through the tokenizer's chat
   template (one user turn plus the assistant generation prompt).
3. `plan_batches`: every (example, sample) row goes to the smallest of a few
   padded prompt-length buckets (`bucket_boundaries`); a bucket is one
   decoder call with one shape, so the decoder compiles once per bucket (and
   not again when only traced knobs such as the threshold change).
4. `decode_plan`: `sdar_jax.decode.decoder.generate_many` on each bucket:
   continuous batching over `batch_size` slots (a finished row's slot takes
   the next waiting row at once, inside the jitted loop), with one PRNG key
   per (example, sample) so a sample depends neither on its batch mates nor
   on its slot; each finished row is handed to the host as it is produced
   (`on_row`). Wall time is measured per call and JAX's compile time (from
   `jax.monitoring` events) is reported apart, so tokens/s is decoding only.
5. `score`: answers checked per style (`sdar_jax.eval.answers`); accuracy over
   all samples (the unbiased pass@1), unbiased pass@k, majority voting over
   the n samples of a problem, per-task accuracy.

`evaluate` runs all of it and returns the per-example records (written by
`write_jsonl`) and a JSON-ready summary; its `on_record` callback receives
each problem's record as soon as its last sample is decoded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from sdar_jax.config import ModelConfig
from sdar_jax.data.tokenizer import Tokenizer
from sdar_jax.decode import decoder
from sdar_jax.eval import answers, metrics
from sdar_jax.checkpoint.sharded_restore import to_host

# JAX's duration events for tracing, lowering and compiling a computation.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How an evaluation is run and scored (decoding knobs live in DecodeConfig).

    Attributes:
      style: answer style, one of `sdar_jax.eval.answers.STYLES`.
      n_samples: samples per problem (> 1 needs temperature > 0).
      ks: the k of pass@k, each in [1, n_samples].
      batch_size: batch rows (slots) of each decoder call.
      num_buckets: most prompt-length buckets (one compilation each).
      bucket_multiple: bucket lengths are rounded up to a multiple of this.
      chat: wrap prompts in the tokenizer's chat template.
      seed: PRNG seed of the sampling keys.
      progress: show a tqdm progress bar.
    """

    style: str = "gsm8k"
    n_samples: int = 1
    ks: tuple[int, ...] = (1,)
    batch_size: int = 64
    num_buckets: int = 3
    bucket_multiple: int = 8
    chat: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        if self.style not in answers.STYLES:
            raise ValueError(f"EvalSettings.style must be one of {answers.STYLES}, got {self.style!r}")
        for name in ("n_samples", "batch_size", "num_buckets", "bucket_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EvalSettings.{name} must be an int >= 1, got {value!r}")
        if not self.ks or any(not 1 <= k <= self.n_samples for k in self.ks):
            raise ValueError(
                f"EvalSettings.ks must be non-empty with every k in [1, n_samples={self.n_samples}], "
                f"got {self.ks}"
            )


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """One decoder call: a bucket's rows through `batch_size` slots.

    Attributes:
      bucket_length: padded prompt length (the call's static max_prompt).
      rows: (example index, sample index) of each row, in decoding order.
      batch_size: slots of the call (at most len(rows)).
    """

    bucket_length: int
    rows: tuple[tuple[int, int], ...]
    batch_size: int


@dataclasses.dataclass(frozen=True)
class RowOutput:
    """What the decoder produced for one (example, sample) row."""

    token_ids: tuple[int, ...]  # generated ids up to and including the first stop id
    num_forwards: int  # denoising forwards the row took part in
    num_committed: int  # positions the row committed


@dataclasses.dataclass(frozen=True)
class DecodeStats:
    """Wall-clock totals of a decoded plan.

    wall_seconds: every decoder call, host sync included.
    compile_seconds: JAX tracing, lowering and compilation inside those calls.
    batch_forwards: denoising forwards the batches ran (each batch runs until
      its slowest row is done), summed over batches.
    num_batches: decoder calls.
    """

    wall_seconds: float
    compile_seconds: float
    batch_forwards: int
    num_batches: int

    @property
    def decode_seconds(self) -> float:
        return max(self.wall_seconds - self.compile_seconds, 0.0)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Per-example records (JSON-ready dicts, in input order) and the summary."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]


# ---- inputs --------------------------------------------------------------------------------------

def load_examples(path: str | os.PathLike[str], prompt_field: str = "prompt",
                  answer_field: str = "answer") -> list[dict[str, Any]]:
    """Reads a JSONL file of problems; each line needs `prompt_field` and `answer_field` strings.

    Returns dicts with `prompt` and `answer` set from those fields and every
    other field kept. Blank lines are skipped.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"evaluation data {path!r} does not exist; expected a JSONL file")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(ex, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(ex).__name__}")
            for field in (prompt_field, answer_field):
                if not isinstance(ex.get(field), str):
                    raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, got "
                                     f"{ex.get(field)!r}; line keys are {sorted(ex)}")
            examples.append({**ex, "prompt": ex[prompt_field], "answer": ex[answer_field]})
    if not examples:
        raise ValueError(f"evaluation data {path!r} holds no examples")
    return examples


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt; with `chat`, rendered as one user turn plus the generation prompt."""
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                 add_generation_prompt=True) for p in prompts]
    ids = tokenizer.encode_batch(list(prompts))
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ValueError(f"prompts {empty[:8]} encode to no tokens; the decoder needs at least one")
    return ids


# ---- bucketing -----------------------------------------------------------------------------------

def bucket_boundaries(lengths: Sequence[int], num_buckets: int, multiple: int = 8) -> list[int]:
    """At most `num_buckets` padded prompt lengths covering `lengths`.

    The sorted lengths are cut into `num_buckets` groups of (nearly) equal
    count; each group's longest length, rounded up to `multiple`, is a
    boundary (duplicates merged). The last boundary covers the longest prompt.

    Args:
      lengths: prompt lengths (>= 1).
      num_buckets: most buckets (compilations).
      multiple: rounding of the boundaries.

    Returns:
      Sorted distinct boundaries.
    """
    if not len(lengths):
        raise ValueError("bucket_boundaries: no prompt lengths")
    ordered = np.sort(np.asarray(lengths, np.int64))
    cuts = np.linspace(0, len(ordered), num_buckets + 1)[1:].astype(np.int64) - 1
    return sorted({int(-(-int(ordered[c]) // multiple) * multiple) for c in np.maximum(cuts, 0)})


def prompt_capacity(model_config: ModelConfig, decode_config: decoder.DecodeConfig) -> int:
    """The longest padded prompt whose decoding canvas fits in max_position_embeddings.

    The canvas holds prompt + max_new_tokens positions, rounded up to whole
    blocks in diffusion mode (`decoder.canvas_length`).
    """
    positions = model_config.max_position_embeddings
    if decode_config.mode == "diffusion":
        positions = positions // decode_config.block_length * decode_config.block_length
    return positions - decode_config.max_new_tokens


def plan_batches(lengths: Sequence[int], n_samples: int, boundaries: Sequence[int],
                 batch_size: int) -> list[BatchPlan]:
    """One decoder call per bucket of (example, sample) rows.

    Each row goes to the smallest boundary >= its prompt length. A bucket's
    slot count is `batch_size`, or its row count when smaller (so a small
    bucket does not decode a mostly empty batch).
    """
    if max(lengths) > max(boundaries):
        raise ValueError(f"longest prompt ({max(lengths)}) exceeds the last bucket ({max(boundaries)})")
    bucket_of = np.searchsorted(np.asarray(boundaries), np.asarray(lengths), side="left")
    plans = []
    for b, bound in enumerate(boundaries):
        rows = [(int(e), s) for e in np.flatnonzero(bucket_of == b) for s in range(n_samples)]
        if rows:
            plans.append(BatchPlan(bound, tuple(rows), min(batch_size, len(rows))))
    return plans


# ---- decoding ------------------------------------------------------------------------------------

@contextlib.contextmanager
def compile_timer() -> Iterator[list[float]]:
    """Sums JAX's trace / lower / compile durations inside the block into `timer[0]` (seconds)."""
    total = [0.0]

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        del kwargs
        if event in _COMPILE_EVENTS:
            total[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def sample_keys(seed: int, example_index: np.ndarray, sample_index: np.ndarray) -> jax.Array:
    """[rows] PRNG keys `fold_in(fold_in(key(seed), example), sample)`: batching-independent."""
    base = jax.random.key(seed)
    return jax.vmap(lambda e, s: jax.random.fold_in(jax.random.fold_in(base, e), s))(
        jnp.asarray(example_index, jnp.int32), jnp.asarray(sample_index, jnp.int32))


def _batch_arrays(plan: BatchPlan, prompt_ids: Sequence[Sequence[int]], pad_id: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """[rows, bucket] int32 right-padded prompts, [rows] lengths, example and sample indices."""
    tokens = np.full((len(plan.rows), plan.bucket_length), pad_id, np.int32)
    lengths = np.zeros((len(plan.rows),), np.int32)
    for i, (e, _) in enumerate(plan.rows):
        ids = prompt_ids[e]
        tokens[i, :len(ids)] = ids
        lengths[i] = len(ids)
    return tokens, lengths, np.asarray([e for e, _ in plan.rows]), np.asarray([s for _, s in plan.rows])


def decode_plan(params: Any, model_config: ModelConfig, prompt_ids: Sequence[Sequence[int]],
                plans: Sequence[BatchPlan], decode_config: decoder.DecodeConfig, *, seed: int,
                pad_id: int = 0, progress: bool = False,
                on_row: Callable[[tuple[int, int], RowOutput], None] | None = None,
                ) -> tuple[dict[tuple[int, int], RowOutput], DecodeStats]:
    """Runs the decoder over every planned bucket, with continuous batching.

    Args:
      params: the model's param pytree.
      model_config: its config.
      prompt_ids: token ids per example.
      plans: from `plan_batches`.
      decode_config: decoding knobs (max_new_tokens, stop ids, strategy, ...).
      seed: sampling seed (see `sample_keys`).
      pad_id: prompt padding id (never attended: rows carry their lengths).
      progress: show a tqdm bar over rows (advanced as rows finish with
        `on_row`, else per bucket).
      on_row: called with ((example, sample), RowOutput) as each row finishes,
        between the decoder's chunks (the same compiled programs as without
        it; the loop returns to the host after each forward that finished a
        row).

    Returns:
      ({(example, sample): RowOutput}, DecodeStats).
    """
    outputs: dict[tuple[int, int], RowOutput] = {}
    wall = compile_s = 0.0
    batch_forwards = 0
    # The row-by-row hook pauses the decoding loop, whose programs hold collectives: every
    # process would have to pause at the same forwards. With several processes, rows reach
    # `on_row` when their bucket's call returns.
    in_loop = jax.process_count() == 1
    total_rows = sum(len(p.rows) for p in plans)
    with tqdm.tqdm(total=total_rows, unit="seq", desc="decode", disable=not progress,
                   dynamic_ncols=True) as bar, compile_timer() as compiled:
        for plan in plans:
            tokens, lengths, ex_idx, s_idx = _batch_arrays(plan, prompt_ids, pad_id)
            keys = sample_keys(seed, ex_idx, s_idx)
            hooks = decoder.Hooks()
            if on_row is not None and in_loop:
                hooks = decoder.Hooks(on_finish=functools.partial(_rows_finished, plan, on_row, bar))
            start, compiled_before = time.perf_counter(), compiled[0]
            result = to_host(decoder.generate_many(
                params, model_config, tokens, lengths, keys, decode_config,
                num_slots=plan.batch_size, hooks=hooks))
            wall += time.perf_counter() - start
            compile_s += compiled[0] - compiled_before
            batch_forwards += int(result.batch_forwards)
            for i, row in enumerate(plan.rows):
                outputs[row] = _row_output(result.tokens[i], result.lengths[i],
                                           result.num_forwards[i], result.num_committed[i])
                if on_row is not None and not in_loop:
                    on_row(row, outputs[row])
            if on_row is None or not in_loop:
                bar.update(len(plan.rows))
    stats = DecodeStats(wall_seconds=wall, compile_seconds=compile_s,
                        batch_forwards=batch_forwards, num_batches=len(plans))
    return outputs, stats


def _row_output(tokens: np.ndarray, length: Any, forwards: Any, committed: Any) -> RowOutput:
    return RowOutput(token_ids=tuple(int(t) for t in np.asarray(tokens)[:int(length)]),
                     num_forwards=int(forwards), num_committed=int(committed))


def _rows_finished(plan: BatchPlan, on_row, bar, items, finished, tokens, lengths, forwards,
                   committed) -> None:
    """`decoder.Hooks.on_finish` of one bucket: hands each finished row to `on_row`."""
    done = np.flatnonzero(np.asarray(finished))
    for slot in done:
        if on_row is not None:
            on_row(plan.rows[int(items[slot])], _row_output(
                tokens[slot], lengths[slot], forwards[slot], committed[slot]))
    bar.update(len(done))


def decode_text(tokenizer: Tokenizer, token_ids: Sequence[int]) -> str:
    """Text of generated ids, special tokens dropped, and so are ids past the tokenizer's
    vocabulary (model embedding tables are often padded beyond it; such ids have no text)."""
    size = tokenizer.vocab_size
    return tokenizer.decode([i for i in token_ids if 0 <= i < size], skip_special_tokens=True)


# ---- scoring -------------------------------------------------------------------------------------

def score_example(example: Mapping[str, Any], texts: Sequence[str], outputs: Sequence[RowOutput],
                  settings: EvalSettings) -> dict[str, Any]:
    """The JSONL record of one problem: its samples, correctness, majority answer and pass@k."""
    style = settings.style
    samples = []
    for text, out in zip(texts, outputs):
        samples.append({
            "text": text,
            "extracted": answers.extract_answer(text, style),
            "correct": answers.is_correct(text, example["answer"], style),
            "num_tokens": len(out.token_ids),
            "num_forwards": out.num_forwards,
            "num_committed": out.num_committed,
            "tpf": out.num_committed / max(out.num_forwards, 1),
        })
    n, c = len(samples), sum(s["correct"] for s in samples)
    extracted = [s["extracted"] for s in samples]
    majority, votes = metrics.majority_vote(extracted, key=lambda a: answers.answer_key(a, style))
    # The majority answer is the first sample's that gave it: that sample's verdict is the vote's.
    majority_correct = majority is not None and samples[extracted.index(majority)]["correct"]
    extra = {k: v for k, v in example.items() if k not in ("prompt", "answer")}
    return {
        **extra,
        "prompt": example["prompt"],
        "answer": example["answer"],
        "samples": samples,
        "num_correct": c,
        "majority_answer": majority,
        "majority_votes": votes,
        "majority_correct": majority_correct,
        "pass_at_k": {str(k): metrics.pass_at_k(n, c, k) for k in settings.ks},
    }


def summarize(records: Sequence[Mapping[str, Any]], stats: DecodeStats, settings: EvalSettings,
              decode_config: decoder.DecodeConfig) -> dict[str, Any]:
    """Accuracy (over all samples), per-task accuracy, pass@k, majority accuracy, TPF, tokens/s.

    `tpf` is total committed positions / total denoising forwards over all
    rows; `mean_tpf` averages the per-row ratios. `tokens_per_second` counts
    the generated tokens kept (up to each row's first stop id) over decoding
    time, compile time excluded.
    """
    samples = [s for r in records for s in r["samples"]]
    correct = [s["correct"] for s in samples]
    overall = metrics.accuracy(correct)
    groups = [str(r.get("task", "all")) for r in records for _ in r["samples"]]
    by_task = {}
    if "all" not in groups:
        by_task = {g: a.accuracy for g, a in metrics.accuracy_by_group(groups, correct).items()
                   if g != "all"}
    committed = sum(s["num_committed"] for s in samples)
    forwards = sum(s["num_forwards"] for s in samples)
    generated = sum(s["num_tokens"] for s in samples)
    decode_s = stats.decode_seconds
    return {
        "num_examples": len(records),
        "n_samples": settings.n_samples,
        "style": settings.style,
        "accuracy": overall.accuracy,
        "accuracy_stderr": overall.stderr,
        "accuracy_by_task": by_task,
        "pass_at_k": {str(k): float(np.mean([r["pass_at_k"][str(k)] for r in records]))
                      for k in settings.ks},
        "majority_accuracy": float(np.mean([r["majority_correct"] for r in records])),
        "tpf": committed / max(forwards, 1),
        "mean_tpf": float(np.mean([s["tpf"] for s in samples])),
        "generated_tokens": generated,
        "num_committed": committed,
        "num_forwards": forwards,
        "batch_forwards": stats.batch_forwards,
        "num_batches": stats.num_batches,
        "wall_seconds": stats.wall_seconds,
        "compile_seconds": stats.compile_seconds,
        "decode_seconds": decode_s,
        "tokens_per_second": generated / decode_s if decode_s > 0 else math.nan,
        "decode_config": dataclasses.asdict(decode_config),
    }


# ---- entry point ---------------------------------------------------------------------------------

def evaluate(params: Any, model_config: ModelConfig, tokenizer: Tokenizer,
             examples: Sequence[Mapping[str, Any]], decode_config: decoder.DecodeConfig,
             settings: EvalSettings,
             on_record: Callable[[int, dict[str, Any]], None] | None = None) -> EvalResult:
    """Decodes every example `settings.n_samples` times and scores the outputs.

    Args:
      params: the model's param pytree.
      model_config: its config.
      tokenizer: encodes prompts and decodes outputs (special tokens dropped).
      examples: dicts with `prompt` and `answer` strings (see `load_examples`).
      decode_config: decoding knobs; its stop_ids end each sample.
      settings: scoring and batching settings.
      on_record: called with (example index, record) as soon as an example's
        last sample is decoded (from inside the decoder call), e.g. to write
        it out at once.

    Returns:
      EvalResult with one record per example, in input order.
    """
    if not examples:
        raise ValueError("evaluate: no examples")
    if settings.n_samples > 1 and decode_config.temperature == 0.0:
        raise ValueError(f"n_samples={settings.n_samples} needs temperature > 0 (greedy decoding "
                         "gives the same sample every time)")
    prompt_ids = encode_prompts(tokenizer, [e["prompt"] for e in examples], settings.chat)
    boundaries, plans = _plan(model_config, prompt_ids, decode_config, settings)
    pad_id = _pad_id(tokenizer)

    def record(e: int, rows: Sequence[RowOutput]) -> dict[str, Any]:
        texts = [decode_text(tokenizer, r.token_ids) for r in rows]
        return score_example(examples[e], texts, rows, settings)

    on_row = None
    if on_record is not None:
        pending: dict[int, dict[int, RowOutput]] = {}

        def on_row(row: tuple[int, int], out: RowOutput) -> None:
            e, s = row
            pending.setdefault(e, {})[s] = out
            if len(pending[e]) == settings.n_samples:
                samples = pending.pop(e)
                on_record(e, record(e, [samples[i] for i in range(settings.n_samples)]))

    outputs, stats = decode_plan(params, model_config, prompt_ids, plans, decode_config,
                                 seed=settings.seed, pad_id=pad_id, progress=settings.progress,
                                 on_row=on_row)
    records = [record(e, [outputs[(e, s)] for s in range(settings.n_samples)])
               for e in range(len(examples))]
    summary = summarize(records, stats, settings, decode_config)
    summary["bucket_lengths"] = boundaries
    return EvalResult(records=records, summary=summary)


def _plan(model_config: ModelConfig, prompt_ids: Sequence[Sequence[int]],
          decode_config: decoder.DecodeConfig, settings: EvalSettings
          ) -> tuple[list[int], list[BatchPlan]]:
    """The bucket boundaries and decoder calls of `prompt_ids`; a prompt whose canvas does
    not fit the model's positions is refused, naming it."""
    lengths = [len(ids) for ids in prompt_ids]
    capacity = prompt_capacity(model_config, decode_config)
    if max(lengths) > capacity:
        longest = int(np.argmax(lengths))
        raise ValueError(
            f"example {longest} has a {lengths[longest]}-token prompt; with max_new_tokens="
            f"{decode_config.max_new_tokens} the model's max_position_embeddings="
            f"{model_config.max_position_embeddings} leaves room for {capacity}")
    # Rounding a bucket up must not push its canvas past the model's positions.
    boundaries = sorted({min(b, capacity) for b in bucket_boundaries(
        lengths, settings.num_buckets, settings.bucket_multiple)})
    return boundaries, plan_batches(lengths, settings.n_samples, boundaries, settings.batch_size)


def _pad_id(tokenizer: Tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def generate_texts(params: Any, model_config: ModelConfig, tokenizer: Tokenizer,
                   prompts: Sequence[str], decode_config: decoder.DecodeConfig,
                   settings: EvalSettings) -> list[str]:
    """The model's completion of each prompt (one sample each, text up to the first stop id,
    special tokens dropped), decoded in the same buckets and batches as `evaluate`.

    Args:
      params, model_config: the model.
      tokenizer: encodes the prompts (through the chat template with
        `settings.chat`) and decodes the completions.
      prompts: the prompt texts.
      decode_config: decoding knobs; its stop_ids end each completion.
      settings: batching (batch_size, num_buckets, bucket_multiple), chat,
        seed and progress; n_samples must be 1.
    """
    if not prompts:
        raise ValueError("generate_texts: no prompts")
    if settings.n_samples != 1:
        raise ValueError(f"generate_texts: one completion per prompt; n_samples is {settings.n_samples}")
    prompt_ids = encode_prompts(tokenizer, prompts, settings.chat)
    _, plans = _plan(model_config, prompt_ids, decode_config, settings)
    outputs, _ = decode_plan(params, model_config, prompt_ids, plans, decode_config,
                             seed=settings.seed, pad_id=_pad_id(tokenizer),
                             progress=settings.progress)
    stops = set(decode_config.stop_ids)
    return [decode_text(tokenizer, [t for t in outputs[(e, 0)].token_ids if t not in stops])
            for e in range(len(prompts))]


def write_jsonl(path: str | os.PathLike[str], records: Sequence[Mapping[str, Any]]) -> None:
    """One JSON object per line (UTF-8); creates the parent directory."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


class JsonlStream:
    """A JSONL output written as results are produced: `append` adds one line and
    flushes it (finished work survives a later failure; the file is created at
    the first line); `finish` rewrites the file with the final records (e.g. in
    input order) through a temporary file and a rename, so it is never
    half-written. Creates the parent directory."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._file = None

    def append(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8", newline="\n")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def finish(self, records: Sequence[Mapping[str, Any]]) -> None:
        if self._file is not None:
            self._file.close()
        partial = self.path + ".partial"
        write_jsonl(partial, records)
        os.replace(partial, self.path)


def write_summary(path: str | os.PathLike[str], summary: Mapping[str, Any]) -> None:
    """The summary as indented JSON; creates the parent directory."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")
