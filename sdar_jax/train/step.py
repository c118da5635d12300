"""The jitted training and evaluation steps.

`train_step(state, batch) -> (state, metrics)` is a pure function: the step's
PRNG key comes from the state (`state.step_rng`). Gradient accumulation is an
explicit `lax.scan` over micro-batches inside the step, so one optimizer step
is one compiled function whatever the accumulation.

Accumulation is exact for the token-normalised objectives: every micro-batch
returns the un-normalised sum of its weighted token losses and its
normaliser (number of loss tokens, or of masked tokens), and the step
divides the summed gradients by the summed normaliser, so the update equals
the one-shot update on the whole batch (for a fixed noise draw). The MoE
load-balancing loss enters as `coef * aux_loss` per micro-batch, weighted by
the micro-batch's share of the normaliser (for one micro-batch: exactly
`loss + coef * aux_loss`).

`compile_train_step` is the only place the step is jitted: it donates the
state and takes optional shardings (from `sdar_jax.parallel`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sdar_jax.checkpoint.params import load_params_checkpoint
from sdar_jax.config import ModelConfig
from sdar_jax.diffusion.loss import ar_loss, sdar_loss
from sdar_jax.model import transformer
from sdar_jax.model.head import chunked_token_ce
from sdar_jax.ops.masks import MaskSpec
from sdar_jax.train import config as run_config
from sdar_jax.train.state import TrainState, step_rng

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
# (params, batch, rng, step) -> (loss, metrics) with metrics holding at least
# weighted_ce_sum, normalizer, accuracy, aux_loss and num_loss_tokens; step
# (int32 scalar, the optimizer step) drives a block-size schedule.
LossFn = Callable[[Any, Batch, jax.Array, jax.Array], tuple[jax.Array, Metrics]]
# The step evaluations run at: past any block-size schedule (its target size).
EVAL_STEP = 2**30


def block_index(step: jax.Array, rng: jax.Array, *, num_sizes: int, mixed: bool,
                schedule_steps: int) -> jax.Array:
    """Which of the run's block sizes (`run_config.block_sizes`) a micro-batch trains at.

    Mixed B: uniform over the sizes, drawn from `rng`. Schedule: size k of
    the growing list for steps [k, k + 1) * schedule_steps / num_sizes, the
    last size from `schedule_steps` on. One size: 0.

    Returns:
      int32 scalar in [0, num_sizes).
    """
    if num_sizes == 1:
        return jnp.zeros((), jnp.int32)
    if mixed:
        return jax.random.randint(rng, (), 0, num_sizes, jnp.int32)
    k = (jnp.asarray(step, jnp.int32) * num_sizes) // max(schedule_steps, 1)
    return jnp.minimum(k, num_sizes - 1).astype(jnp.int32)


def make_teacher_fn(config: ml_collections.ConfigDict) -> Callable[..., jax.Array]:
    """The AR teacher of distillation: `objective.distill_from` (else `train.init_from`),
    run causally. Its params enter the compiled step as constants (fine for the
    small models distillation is meant for here)."""
    path = config.objective.distill_from or config.train.init_from
    if not path:
        raise run_config.RunConfigError(
            "objective.distill_weight > 0 needs a teacher: set objective.distill_from or "
            "train.init_from")
    teacher, params = load_params_checkpoint(path)

    def teacher_fn(tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        return transformer.apply(teacher, params, tokens, positions, mask=MaskSpec("causal"),
                                 segment_ids=segment_ids).logits

    return teacher_fn


def make_loss_fn(config: ml_collections.ConfigDict, model: ModelConfig) -> LossFn:
    """The objective of the run (`objective.kind`) as `(params, batch, rng, step) -> (loss, metrics)`.

    With several block sizes (`objective.mixed_block_sizes` or a block-size
    schedule) every size is one branch of a `lax.switch`, so the step stays
    one compiled function and each micro-batch runs only its own branch.
    """
    obj = config.objective
    apply_fn = functools.partial(transformer.apply, model)
    if obj.kind == "sdar":
        sizes = run_config.block_sizes(config, model)
        mixed = bool(obj.mixed_block_sizes)
        teacher_fn = make_teacher_fn(config) if obj.distill_weight > 0 else None
        branches = [functools.partial(
            sdar_loss, apply_fn, block_size=b, mask_token_id=model.mask_token_id,
            normalization=obj.normalization, eps=obj.eps, max_tries=obj.max_tries,
            logits_convention=model.logits_convention, complementary=obj.complementary_masking,
            teacher_fn=teacher_fn, distill_weight=obj.distill_weight,
            block_attention=model.block_attention, ar_weight=obj.ar_loss_weight,
        ) for b in sizes]

        def loss_fn(params: Any, batch: Batch, rng: jax.Array,
                    step: jax.Array | int = 0) -> tuple[jax.Array, Metrics]:
            token_ce = chunked_token_ce(model, params)  # no whole-row float32 logits
            if len(branches) == 1:
                return branches[0](params, batch, rng, token_ce=token_ce)
            choice_rng, rng = jax.random.split(rng)
            k = block_index(step, choice_rng, num_sizes=len(sizes), mixed=mixed,
                            schedule_steps=obj.block_schedule_steps)
            return jax.lax.switch(
                k, [functools.partial(f, token_ce=token_ce) for f in branches], params, batch, rng
            )

        return loss_fn
    if obj.kind == "ar":

        def ar_loss_fn(params: Any, batch: Batch, rng: jax.Array,
                       step: jax.Array | int = 0) -> tuple[jax.Array, Metrics]:
            del rng, step  # the AR objective is deterministic
            loss, metrics = ar_loss(apply_fn, params, batch, chunked_token_ce(model, params))
            return loss, {**metrics, "num_loss_tokens": metrics["num_targets"]}

        return ar_loss_fn
    raise run_config.RunConfigError(
        f"objective.kind is {obj.kind!r}; expected one of {run_config.OBJECTIVES}"
    )


def _num_predicted(metrics: Metrics) -> jax.Array:
    """The tokens `accuracy` is measured over (masked tokens, or AR targets)."""
    return metrics["num_masked"] if "num_masked" in metrics else metrics["num_targets"]


def _split_micro_batches(batch: Batch, num_micro: int) -> Batch:
    """[global_batch, ...] -> [num_micro, global_batch / num_micro, ...] for every array.

    Micro-batch i holds rows i, i + num_micro, i + 2 * num_micro, ...: with the
    batch sharded in contiguous row blocks, every micro-batch then spans all
    the devices the batch does (a contiguous split would put each micro-batch
    on a fraction of them).
    """

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % num_micro:
            raise ValueError(
                f"batch size {x.shape[0]} is not divisible by grad_accum_steps {num_micro}"
            )
        rows = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
        return jnp.swapaxes(rows, 0, 1)

    return {k: split(jnp.asarray(v)) for k, v in batch.items()}


def _sums(metrics: Metrics) -> dict[str, jax.Array]:
    """The additive statistics of one micro-batch (float32 scalars)."""
    normalizer = metrics["normalizer"].astype(jnp.float32)
    num_predicted = _num_predicted(metrics).astype(jnp.float32)
    return {
        "weighted_ce_sum": metrics["weighted_ce_sum"],
        "normalizer": normalizer,
        "aux_sum": metrics["aux_loss"] * normalizer,
        "correct": metrics["accuracy"] * num_predicted,
        "num_predicted": num_predicted,
        "num_loss_tokens": metrics["num_loss_tokens"].astype(jnp.float32),
    }


def _finish(sums: dict[str, jax.Array], aux_coef: float) -> Metrics:
    normalizer = jnp.maximum(sums["normalizer"], 1.0)
    aux = sums["aux_sum"] / normalizer
    return {
        "loss": sums["weighted_ce_sum"] / normalizer + aux_coef * aux,
        "aux_loss": aux,
        "accuracy": sums["correct"] / jnp.maximum(sums["num_predicted"], 1.0),
        "num_loss_tokens": sums["num_loss_tokens"],
    }


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int,
    aux_coef: float,
) -> tuple[TrainState, Metrics]:
    """One optimizer update on a global batch, scanning over micro-batches.

    Args:
      state: the current TrainState.
      batch: the shared batch dict, each array [global_batch, seq].
      loss_fn: the objective (see `make_loss_fn`).
      tx: the optimizer.
      schedule: the learning-rate schedule (reported, and the one inside tx).
      grad_accum_steps: number of micro-batches the global batch is split into.
      aux_coef: the MoE load-balancing loss coefficient.

    Returns:
      (new_state, metrics): float32 scalars loss, aux_loss, accuracy (argmax
      hits over the masked tokens / AR targets), num_loss_tokens, num_tokens
      (non-padding tokens of the batch), grad_norm
      (before clipping), learning_rate (of this update).
    """
    micro_batches = _split_micro_batches(batch, grad_accum_steps)
    rngs = jax.random.split(step_rng(state), grad_accum_steps)

    def objective(params: Any, micro: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        _, metrics = loss_fn(params, micro, rng, state.step)
        normalizer = jax.lax.stop_gradient(metrics["normalizer"].astype(jnp.float32))
        return metrics["weighted_ce_sum"] + aux_coef * metrics["aux_loss"] * normalizer, metrics

    grad_fn = jax.grad(objective, has_aux=True)

    def accumulate(carry, xs):
        grad_sum, sums = carry
        micro, rng = xs
        grads, metrics = grad_fn(state.params, micro, rng)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grad_sum, grads)
        sums = jax.tree.map(jnp.add, sums, _sums(metrics))
        return (grad_sum, sums), None

    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in (
        "weighted_ce_sum", "normalizer", "aux_sum", "correct", "num_predicted", "num_loss_tokens"
    )}
    (grad_sum, sums), _ = jax.lax.scan(
        accumulate, (zero_grads, zero_sums), (micro_batches, rngs)
    )
    normalizer = jnp.maximum(sums["normalizer"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / normalizer).astype(p.dtype), grad_sum, state.params)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _finish(sums, aux_coef)
    metrics["num_tokens"] = jnp.sum(batch["segment_ids"] != 0, dtype=jnp.float32)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(params: Any, batch: Batch, rng: jax.Array, *, loss_fn: LossFn) -> Metrics:
    """The additive statistics of one held-out batch (combine with `reduce_eval`).

    Args:
      params: model parameters.
      batch: the shared batch dict, [batch, seq] arrays.
      rng: the noise key (fixed per eval batch, so evaluations are comparable).
    """
    _, metrics = loss_fn(params, batch, rng, EVAL_STEP)
    return _sums(metrics)


def reduce_eval(sums: list[Mapping[str, Any]], aux_coef: float) -> dict[str, float]:
    """Combines per-batch `eval_step` statistics into eval loss / accuracy."""
    if not sums:
        raise ValueError("reduce_eval: no eval batches")
    total = {k: sum(float(s[k]) for s in sums) for k in sums[0]}
    return {k: float(v) for k, v in _finish(total, aux_coef).items() if k != "num_loss_tokens"}


def build_train_step(
    config: ml_collections.ConfigDict,
    model: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_fn: LossFn | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`train_step` with the run's objective and optimizer bound (not jitted)."""
    return functools.partial(
        train_step,
        loss_fn=loss_fn or make_loss_fn(config, model),
        tx=tx,
        schedule=schedule,
        grad_accum_steps=config.optimizer.grad_accum_steps,
        aux_coef=run_config.aux_loss_coef(config, model),
    )


def compile_train_step(
    config: ml_collections.ConfigDict,
    model: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    loss_fn: LossFn | None = None,
    state_shardings: Any = None,
    batch_shardings: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The jitted train step; the input state is donated.

    With `state_shardings` (a TrainState-shaped pytree of shardings) and
    `batch_shardings`, inputs and the new state are laid out accordingly and
    the metrics are replicated; without them, jit's defaults apply.
    """
    step = build_train_step(config, model, tx, schedule, loss_fn)
    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(
        step,
        donate_argnums=0,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
    )


def compile_eval_step(
    config: ml_collections.ConfigDict, model: ModelConfig, loss_fn: LossFn | None = None
) -> Callable[[Any, Batch, jax.Array], Metrics]:
    """The jitted eval step `(params, batch, rng) -> sums`."""
    return jax.jit(functools.partial(
        eval_step,
        loss_fn=loss_fn or make_loss_fn(config, model),
    ))
