"""The training loop: restore or initialise, step, log, evaluate, checkpoint, export.

One call to `train(config)` runs (or resumes) a run in `config.train.workdir`:

  workdir/checkpoints/<step>/  orbax: train state + data-iterator state + config
  workdir/tensorboard/         event files (train/*, eval/*)
  workdir/export/              the final params (`sdar_jax.checkpoint.params` format),
                               loadable by generate / evaluate

Resume is exact: the newest intact checkpoint restores params, optimizer
state, step, PRNG key and the data iterator's position, so the continued run
computes the same losses, step for step, as an uninterrupted one. Before
restoring, the run checks (`sdar_jax.checkpoint.train_state`, `config.check_resume`):
- integrity: the step's files match their recorded sizes and SHA-256, its
  items restore and its state is finite; else a warning names the step and
  the file, and the next older step is tried (`CheckpointIntegrityError` when
  none is intact);
- the config: architecture and data-layout changes are refused
  (`ConfigChangeError`, listing old -> new); other changes (learning rate,
  steps, intervals, ...) too, unless `train.allow_config_change` is set, which
  logs the list and goes on.
TensorBoard events are written out before every checkpoint (the event file is
closed, and the next scalars go to a new one), so after a crash the event
files hold every step up to the newest checkpoint.

Stopping: SIGTERM (single-process runs install a handler; multi-host runs use
JAX's preemption sync point through orbax) makes the loop save the current
step and return normally. A non-finite loss or gradient norm raises
`NonFiniteLossError` naming the step, before anything is saved at that step,
so the newest checkpoint is the last good one. Metrics are fetched to the
host after every step (one sync per step): that is what makes the stop exact,
and at the sizes this trainer targets a step is far longer than the sync.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import signal
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from sdar_jax import parallel
from sdar_jax.checkpoint import train_state
from sdar_jax.checkpoint.params import load_params_checkpoint, save_params_checkpoint
from sdar_jax.config import ModelConfig
from sdar_jax.data import pipeline
from sdar_jax.data.tokenizer import Tokenizer
from sdar_jax.model import sharding as model_sharding
from sdar_jax.train import config as run_config
from sdar_jax.train import optimizer as optimizer_lib
from sdar_jax.train import step as step_lib
from sdar_jax.train.metrics import MetricsWriter, Throughput
from sdar_jax.train.state import TrainState, abstract_train_state, create_train_state

CHECKPOINT_SUBDIR = "checkpoints"
TENSORBOARD_SUBDIR = "tensorboard"
EXPORT_SUBDIR = "export"

_log = logging.getLogger(__name__)

# A fresh iterable of held-out batches each time it is called.
EvalData = Callable[[], Iterable[Mapping[str, np.ndarray]]]


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; `step` is the update that produced it."""

    def __init__(self, step: int, metrics: Mapping[str, float], last_checkpoint: int | None):
        self.step = step
        self.last_checkpoint = last_checkpoint
        super().__init__(
            f"non-finite training metrics at step {step}: loss={metrics['loss']}, "
            f"grad_norm={metrics['grad_norm']}; stopped without saving it "
            f"(last good checkpoint: step {last_checkpoint})"
        )


@dataclasses.dataclass
class TrainResult:
    """What a call to `train` did.

    step: the step the run stopped at (= updates applied).
    preempted: True when a SIGTERM / preemption stopped it early.
    history: per-step metrics (float) of the steps run in this call, in order.
    eval_history: (step, eval metrics) pairs.
    export_dir: where the final params were exported, if they were.
    skipped_records: malformed training records skipped in this call
      (data.on_bad_record='skip').
    """

    step: int
    preempted: bool
    history: list[dict[str, float]]
    eval_history: list[tuple[int, dict[str, float]]]
    export_dir: str | None
    skipped_records: int = 0


class PreemptionFlag:
    """Records SIGTERM while installed (a context manager; main thread only).

    Installed only in single-process runs: with several processes JAX's
    distributed runtime owns SIGTERM and orbax's `reached_preemption` tells
    every host to stop at the same step.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.requested = True

    def __enter__(self) -> "PreemptionFlag":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


def _load_tokenizer(config: ml_collections.ConfigDict, model: ModelConfig) -> Tokenizer:
    """The run's tokenizer, checked against the model's vocabulary and mask token."""
    directory = run_config.require(config, "data.tokenizer_dir", "the tokenizer of the training data")
    tokenizer = Tokenizer.from_dir(directory)
    if tokenizer.vocab_size > model.vocab_size:
        raise run_config.RunConfigError(
            f"tokenizer {directory} has {tokenizer.vocab_size} tokens but the model's vocab_size "
            f"is {model.vocab_size}; set model.overrides.vocab_size"
        )
    if config.objective.kind == "sdar" and tokenizer.mask_token_id != model.mask_token_id:
        raise run_config.RunConfigError(
            f"the model's mask_token_id {model.mask_token_id} differs from tokenizer {directory}'s "
            f"mask token id {tokenizer.mask_token_id}; set model.overrides.mask_token_id"
        )
    return tokenizer


def _make_data(
    config: ml_collections.ConfigDict, model: ModelConfig, bad_records: pipeline.BadRecordCounter,
) -> tuple[Iterator, EvalData | None]:
    """The run's grain train iterator and eval-batch factory, from `config.data`
    (malformed records skipped under data.on_bad_record='skip' are counted in `bad_records`)."""
    data = config.data
    run_config.require(config, "data.train_path", "the training data")
    tokenizer = _load_tokenizer(config, model)
    block = run_config.data_block_size(config, model)
    train_iter = pipeline.make_train_iterator(
        data, tokenizer, block, data.seq_len, data.global_batch_size, data.seed,
        bad_records=bad_records,
    )
    if not data.eval_path:
        return train_iter, None

    def eval_batches() -> Iterator:
        return pipeline.make_eval_iterator(
            data, tokenizer, block, data.seq_len, data.global_batch_size,
            num_batches=config.train.eval_batches,
        )

    return train_iter, eval_batches


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the state and the batches live: shardings over the run's mesh."""

    context: parallel.ShardingContext  # active around the whole run (the model's constraints read it)
    state: Any  # TrainState of NamedShardings
    batch: dict[str, jax.sharding.NamedSharding]
    global_batch: int

    def put_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays laid out by `self.batch`."""
        return parallel.shard_batch(dict(local_batch), self.batch, self.global_batch)


def _layout(config: ml_collections.ConfigDict, model: ModelConfig, tx: Any, devices: Any) -> _Layout:
    context = parallel.ShardingContext.from_config(parallel.ParallelConfig.from_mapping(config.mesh), devices)
    abstract = abstract_train_state(model, tx)
    global_batch, seq_len = config.data.global_batch_size, config.data.seq_len
    batch = {
        key: jax.ShapeDtypeStruct((global_batch, seq_len), np.bool_ if key == "loss_mask" else np.int32)
        for key in ("tokens", "segment_ids", "positions", "loss_mask")
    }
    batch_shardings = context.batch_shardings(batch)
    # Each process feeds its own rows: stop now, naming the mesh, if its devices hold others.
    parallel.check_process_layout(batch_shardings["tokens"], global_batch)
    return _Layout(
        context=context,
        state=model_sharding.state_shardings(abstract, model, context),
        batch=batch_shardings,
        global_batch=global_batch,
    )


def _initial_state(
    config: ml_collections.ConfigDict, model: ModelConfig, tx: Any, layout: _Layout,
    checkpointer: train_state.Checkpointer, train_iter: Iterator,
) -> TrainState:
    """The newest intact checkpoint's state (iterator repositioned; its config
    checked against `config`), else a fresh one (params from train.init_from, or random)."""
    if checkpointer.all_steps():
        abstract = train_state.with_shardings(abstract_train_state(model, tx), layout.state)
        restored = checkpointer.restore(
            abstract, train_iter, check_config=functools.partial(_check_resume, config)
        )
        return restored.state
    rng = jax.random.key(config.train.seed)
    if config.train.init_from:
        _, params = load_params_checkpoint(
            config.train.init_from, dtype=model.param_dtype, shardings=layout.state.params
        )
        init = jax.jit(lambda p, r: create_train_state(model, tx, r, p), out_shardings=layout.state)
        return init(params, rng)
    return jax.jit(lambda r: create_train_state(model, tx, r), out_shardings=layout.state)(rng)


def _check_resume(config: ml_collections.ConfigDict, step: int, saved: Mapping[str, Any]) -> None:
    """Refuses (raises) or logs the differences between step `step`'s saved config and `config`."""
    changes = run_config.check_resume(
        saved, config.to_dict(), step=step, allow_change=config.train.allow_config_change
    )
    if changes:
        _log.warning(
            "resuming step %d with a changed config (train.allow_config_change=True): %s",
            step, "; ".join(map(str, changes)),
        )


def _finite(metrics: Mapping[str, float]) -> bool:
    return math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])


def evaluate(
    eval_fn: Callable[..., Mapping[str, jax.Array]], params: Any, batches: Iterable[Mapping[str, np.ndarray]],
    *, max_batches: int, seed: int, aux_coef: float,
    put_batch: Callable[[Mapping[str, np.ndarray]], Any] = jax.device_put,
) -> dict[str, float]:
    """Eval loss / accuracy over up to `max_batches` held-out batches.

    Batch i draws its noise from `fold_in(key(seed), i)`, the same at every
    evaluation, so eval losses of different steps are comparable.
    """
    base = jax.random.key(seed)
    sums = []
    for i, batch in enumerate(batches):
        if i == max_batches:
            break
        sums.append(jax.device_get(eval_fn(params, put_batch(batch), jax.random.fold_in(base, i))))
    return step_lib.reduce_eval(sums, aux_coef)


def train(
    config: ml_collections.ConfigDict,
    *,
    train_data: Iterator | None = None,
    eval_data: EvalData | None = None,
    loss_fn: step_lib.LossFn | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> TrainResult:
    """Runs (or resumes) the run described by `config`.

    Args:
      config: the run config (`sdar_jax.train.config.base_config()` fields).
      train_data: a grain iterator of this process's batches (dicts of numpy
        [batch, seq] arrays, the shared batch contract) with get_state /
        set_state; None builds it from `config.data`.
      eval_data: a factory of held-out batch iterables; None builds it from
        `config.data.eval_path` (no eval when that is unset).
      loss_fn: replaces the objective of `config.objective` (tests).
      devices: the devices of the mesh (`config.mesh`); all by default.

    Returns:
      TrainResult.

    Raises:
      NonFiniteLossError: the loss or gradient norm was NaN/inf at some step.
      checkpoint.integrity.CheckpointIntegrityError: the workdir has checkpoints, none intact.
      run_config.ConfigChangeError: the config differs from the checkpoint's (`check_resume`).
      TokenizerError, DataSourceError, RunConfigError, ...: bad input, naming the file / field.
    """
    run_config.check_required(config)
    model = run_config.model_config(config)
    run_config.validate(config, model)
    workdir = run_config.workdir(config)
    tcfg = config.train
    total_steps = tcfg.steps
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer, total_steps)
    tx = optimizer_lib.make_optimizer(config.optimizer, total_steps)
    aux_coef = run_config.aux_loss_coef(config, model)
    bad_records = pipeline.BadRecordCounter()
    if train_data is None:
        train_data, default_eval = _make_data(config, model, bad_records)
        eval_data = eval_data or default_eval
    layout = _layout(config, model, tx, devices)
    train_step = step_lib.compile_train_step(
        config, model, tx, schedule, loss_fn=loss_fn, state_shardings=layout.state,
        batch_shardings=layout.batch,
    )
    eval_fn = step_lib.compile_eval_step(config, model, loss_fn=loss_fn) if eval_data else None
    config_json = config.to_dict()

    history: list[dict[str, float]] = []
    eval_history: list[tuple[int, dict[str, float]]] = []
    preempted = False
    checkpointer = train_state.Checkpointer(
        os.path.join(workdir, CHECKPOINT_SUBDIR), save_every=tcfg.checkpoint_every, keep=tcfg.keep,
        async_save=tcfg.async_checkpointing,
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(checkpointer)
        stack.enter_context(layout.context.activate())
        flag = stack.enter_context(PreemptionFlag())
        state = _initial_state(config, model, tx, layout, checkpointer, train_data)
        step = int(jax.device_get(state.step))
        writer = MetricsWriter(
            os.path.join(workdir, TENSORBOARD_SUBDIR), total_steps=total_steps, initial_step=step,
            enabled=jax.process_index() == 0, progress_bar=tcfg.progress_bar,
        )
        stack.callback(writer.close)
        throughput = Throughput()
        while step < total_steps:
            batch = layout.put_batch(next(train_data))
            state, metrics = train_step(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            step += 1
            if not _finite(metrics):
                checkpointer.wait()
                raise NonFiniteLossError(step, metrics, checkpointer.latest_step())
            rate = throughput.update(metrics["num_tokens"])
            if rate is not None:
                metrics["tokens_per_s"] = rate
            history.append(metrics)
            writer.advance()
            if step % tcfg.log_every == 0 or step == total_steps:
                writer.write_scalars(step, metrics)
                writer.set_postfix({k: metrics[k] for k in ("loss", "accuracy", "learning_rate")})
            if eval_fn is not None and (step % tcfg.eval_every == 0 or step == total_steps):
                result = evaluate(
                    eval_fn, state.params, eval_data(), max_batches=tcfg.eval_batches,
                    seed=tcfg.seed, aux_coef=aux_coef, put_batch=layout.put_batch,
                )
                eval_history.append((step, result))
                writer.write_scalars(step, result, prefix="eval")
                writer.write_text(f"step {step}: eval " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
                throughput.reset()
            preempted = flag.requested or checkpointer.reached_preemption(step)
            if checkpointer.should_save(step) or preempted or step == total_steps:
                writer.flush()  # the events of every step up to a checkpoint are on disk
                checkpointer.save(step, state, train_data, config_json, force=True)
                throughput.reset()
            if preempted:
                writer.write_text(f"step {step}: preemption requested; saved checkpoint and stopping")
                break
        writer.flush()

    export_dir = None
    if step == total_steps and tcfg.export:
        export_dir = os.path.join(workdir, EXPORT_SUBDIR)
        save_params_checkpoint(
            export_dir, model, state.params, overwrite=True, aux_dir=config.data.tokenizer_dir,
        )
    return TrainResult(
        step=step, preempted=preempted, history=history, eval_history=eval_history,
        export_dir=export_dir, skipped_records=bad_records.count,
    )
