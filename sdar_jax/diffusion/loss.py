"""Training objectives: the SDAR block-diffusion loss (spec §2) and the AR baseline.

Both take the model as a plain function,
`apply_fn(params, tokens, positions, *, mask, segment_ids, logits_slice)`
returning an object with `logits` ([batch, seq', vocab]) and `aux_loss` (scalar,
the MoE load-balancing loss; 0 for dense models), e.g.
`functools.partial(sdar_jax.model.transformer.apply, config)`. The returned
loss does not include the aux loss: the trainer adds `coefficient * aux_loss`.

Batches follow the shared contract: a dict with `tokens`, `positions`,
`segment_ids` ([batch, seq] int32) and `loss_mask` ([batch, seq] bool).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdar_jax.diffusion.noise import (
    DEFAULT_EPS, DEFAULT_MAX_TRIES, complementary_noise, diffusion_row, noise_tokens, segment_bounds,
)
from sdar_jax import config as model_config_lib
from sdar_jax.ops.masks import MaskSpec

ApplyFn = Callable[..., Any]
# (tokens, positions, segment_ids) [batch, L] -> causal next-token logits [batch, L, vocab].
TeacherFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]
Normalization = Literal["non_prompt", "masked"]
NORMALIZATIONS = ("non_prompt", "masked")
LogitsConvention = Literal["same_position", "shifted"]
LOGITS_CONVENTIONS = model_config_lib.LOGITS_CONVENTIONS
BlockAttention = Literal["bidirectional", "causal"]
BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


def _check_batch(batch: Mapping[str, jnp.ndarray], caller: str) -> None:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"{caller}: batch lacks {missing}; expected keys {BATCH_KEYS}")
    shape = batch["tokens"].shape
    if len(shape) != 2:
        raise ValueError(f"{caller}: batch['tokens'] must be [batch, seq], got shape {shape}")
    for key in BATCH_KEYS[1:]:
        if batch[key].shape != shape:
            raise ValueError(f"{caller}: batch[{key!r}] has shape {batch[key].shape}, expected {shape}")


def token_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-token cross entropy (float32, log-softmax with max subtraction) and hits.

    Args:
      logits: [batch, seq, vocab] float.
      targets: [batch, seq] int32.

    Returns:
      (ce, correct): [batch, seq] float32 and [batch, seq] bool (argmax == target).
    """
    logits = logits.astype(jnp.float32)
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = jnp.argmax(logits, axis=-1) == targets
    return ce, correct


def logits_token_ce(out: Any, targets: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The default `token_ce`: `token_cross_entropy` of the model output's logits. Pass
    `sdar_jax.model.head.chunked_token_ce(...)` instead to never form whole-row float32 logits."""
    return token_cross_entropy(out.logits, targets)


def _safe_div(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
    return num / jnp.maximum(den, 1).astype(jnp.float32)


def prediction_index(seq: int, block_size: int, convention: LogitsConvention) -> np.ndarray:
    """Which output of the 2L-token `[xt ; x0]` row predicts the token at each position j.

    `same_position`: the noisy-half output at j. `shifted` (spec §2.7): the
    noisy-half output at j - 1 when j is not the first position of its block,
    else the clean-half output at j - 1 (index L + j - 1: the last position of
    the previous clean block, which sees exactly the causal AR context). j = 0
    has no predecessor; its entry (0) must not be used (see `shifted_eligible`).

    Returns:
      [seq] int32 indices into the row's 2L outputs.
    """
    if convention not in LOGITS_CONVENTIONS:
        raise ValueError(f"logits convention {convention!r} is not one of {LOGITS_CONVENTIONS}")
    j = np.arange(seq, dtype=np.int32)
    if convention == "same_position":
        return j
    index = np.where(j % block_size == 0, seq + j - 1, j - 1)
    index[0] = 0
    return index.astype(np.int32)


def shifted_eligible(loss_mask: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
    """loss_mask without the first token of each packed example (no predecessor to read from).

    Args:
      loss_mask: [batch, seq] bool; segment_ids: [batch, seq] int32.

    Returns:
      [batch, seq] bool.
    """
    start, _ = segment_bounds(segment_ids)
    return loss_mask.astype(bool) & (start != jnp.arange(loss_mask.shape[1], dtype=start.dtype))


def sdar_loss(
    apply_fn: ApplyFn,
    params: Any,
    batch: Mapping[str, jnp.ndarray],
    rng: jax.Array,
    *,
    block_size: int,
    mask_token_id: int,
    normalization: Normalization = "non_prompt",
    eps: float = DEFAULT_EPS,
    max_tries: int = DEFAULT_MAX_TRIES,
    token_ce: Callable[[Any, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]] = logits_token_ce,
    logits_convention: LogitsConvention = "same_position",
    complementary: bool = False,
    teacher_fn: TeacherFn | None = None,
    distill_weight: float = 0.0,
    block_attention: BlockAttention = "bidirectional",
    ar_weight: float = 0.0,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The SDAR objective: masked-token CE weighted by 1/p over the `[xt ; x0]` row.

    loss = sum over masked i of CE(logits_i, x0_i) / p_i, divided by the number
    of maskable tokens in the batch (`normalization="non_prompt"`, the
    release's current code) or by the number of masked tokens (`"masked"`, what
    the released checkpoints were trained with). With the default
    `same_position` convention position i predicts the token at i and logits
    are read from the noisy half only; with `shifted` the prediction of token
    i is read from the output `prediction_index` names (both halves' logits
    are computed: the head runs on 2L positions), and the first token of each
    packed example is never masked (it has no predecessor).

    `complementary` (spec §2.7): each row is noised twice with complementary
    masks (`noise.complementary_noise`, noise levels t and 1 - t), both copies
    go through one forward of twice the rows, and the loss is the sum over
    both copies divided by the sum of both copies' normalisers (2 x maskable
    tokens, or all masked tokens of both): the mean of two unbiased
    estimates. `max_tries` is unused then (every token is masked once).

    Distillation (`teacher_fn`, `distill_weight` > 0): for every masked token
    whose in-block left context is clean in its copy (`left_clean_masked`),
    the soft cross entropy from the teacher's next-token distribution at j - 1
    (an AR model on the clean row; that is exactly its context) to the
    student's prediction of j is added, times `distill_weight`, to the
    weighted CE sum (no 1/p weight; same normaliser). The teacher gets no
    gradient.

    AR term (`ar_weight` > 0; an aid beyond spec §2.7, docs/adaptation.md):
    with causal attention inside blocks the clean half is exactly an AR
    forward, so its output at j - 1 is the model's next-token prediction of
    token j with every earlier token clean, which is what a decoding step
    reads for the leftmost masked position. For every eligible token j (as
    above: maskable and with a predecessor in its example) CE(clean-half
    output at L + j - 1, x0_j) is added, unweighted and times `ar_weight`, to
    the weighted CE sum (same normaliser). It costs no extra forward: the
    shifted convention already runs the head on both halves.

    Args:
      apply_fn: the model function (see the module docstring).
      params: the model parameters.
      batch: tokens / positions / segment_ids [batch, L] int32, loss_mask
        [batch, L] bool. Every packed example starts on a block boundary.
      rng: PRNG key for the noise.
      block_size: B of the block-diffusion mask.
      mask_token_id: the mask token.
      normalization: "non_prompt" or "masked".
      eps: noise-level floor.
      max_tries: draws per segment before forcing one masked token.
      token_ce: (model output, targets [batch, seq]) -> (ce, correct), both [batch, seq].
      logits_convention: "same_position" or "shifted".
      complementary: noise every row twice with complementary masks.
      teacher_fn: `(tokens, positions, segment_ids) -> [batch, L, vocab]`
        causal next-token logits of the teacher, or None.
      distill_weight: weight of the distillation term.
      block_attention: attention inside a block (`masks.MaskSpec.causal_in_block`
        when "causal"): the model's `block_attention`.
      ar_weight: weight of the AR term (below); needs `shifted` and `causal`.

    Returns:
      (loss, metrics): loss is a float32 scalar; metrics holds float32/int32
      scalars: loss, ce (unweighted mean CE over masked tokens), accuracy
      (argmax hits over masked tokens), num_masked, num_loss_tokens (maskable
      tokens, counted once per copy), weighted_ce_sum and normalizer (loss =
      weighted_ce_sum / max(normalizer, 1), for exact accumulation over
      micro-batches), aux_loss.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"sdar_loss: normalization {normalization!r} is not one of {NORMALIZATIONS}")
    _check_batch(batch, "sdar_loss")
    x0, loss_mask = batch["tokens"], batch["loss_mask"].astype(bool)
    positions, segments = batch["positions"], batch["segment_ids"]
    seq = x0.shape[1]
    if seq % block_size:
        raise ValueError(f"sdar_loss: sequence length {seq} is not a multiple of block_size {block_size}")
    index = prediction_index(seq, block_size, logits_convention)
    shifted = logits_convention == "shifted"
    if ar_weight > 0 and not (shifted and block_attention == "causal"):
        raise ValueError(
            f"sdar_loss: ar_weight {ar_weight} needs logits_convention 'shifted' and block_attention "
            f"'causal' (the clean half must be an AR forward), got {logits_convention!r} and "
            f"{block_attention!r}")
    eligible = shifted_eligible(loss_mask, segments) if shifted else loss_mask
    if complementary:
        first, second = complementary_noise(
            rng, x0, eligible, segments, mask_token_id=mask_token_id, eps=eps)
        xt, masked, p = (jnp.concatenate([a, b], axis=0) for a, b in zip(first, second))
        x0, positions, segments, eligible = (
            jnp.concatenate([a, a], axis=0) for a in (x0, positions, segments, eligible))
    else:
        noised = noise_tokens(
            rng, x0, eligible, segments, mask_token_id=mask_token_id, eps=eps, max_tries=max_tries,
        )
        xt, masked, p = noised
    teacher_logits = None
    if teacher_fn is not None and distill_weight > 0:
        teacher_logits = jax.lax.stop_gradient(
            teacher_fn(batch["tokens"], batch["positions"], batch["segment_ids"]))
        if complementary:
            teacher_logits = jnp.concatenate([teacher_logits, teacher_logits], axis=0)
    tokens, row_positions, row_segments = diffusion_row(xt, x0, positions, segments)
    out = apply_fn(
        params, tokens, row_positions,
        mask=MaskSpec("block_diffusion", block_size, block_attention == "causal"),
        segment_ids=row_segments, logits_slice=(0, 2 * seq) if shifted else (0, seq),
    )
    ar_sum = jnp.zeros((), jnp.float32)
    if ar_weight > 0:  # the clean half's output at L + j - 1 predicts token j
        ar_ce, _ = token_ce(_outputs_at(out, seq + np.maximum(np.arange(seq, dtype=np.int32) - 1, 0)), x0)
        ar_sum = jnp.sum(jnp.where(eligible, ar_ce, 0.0))
    if shifted:  # outputs read at j - 1 (spec 2.7), for the CE and for distillation
        out = _outputs_at(out, index)
    logits = out.logits
    ce, correct = token_ce(out, x0)
    num_masked = masked.sum(dtype=jnp.int32)
    num_loss_tokens = eligible.sum(dtype=jnp.int32)
    weighted_ce_sum = jnp.sum(jnp.where(masked, ce / p, 0.0))
    weighted_ce_sum = weighted_ce_sum + ar_weight * ar_sum
    distill_sum = jnp.zeros((), jnp.float32)
    if teacher_logits is not None:
        select = left_clean_masked(masked, block_size) & _has_predecessor(segments)
        distill_sum = jnp.sum(jnp.where(select, soft_cross_entropy(teacher_logits, logits), 0.0))
        weighted_ce_sum = weighted_ce_sum + distill_weight * distill_sum
    normalizer = num_loss_tokens if normalization == "non_prompt" else num_masked
    loss = _safe_div(weighted_ce_sum, normalizer)
    metrics = {
        "loss": loss,
        "ce": _safe_div(jnp.sum(jnp.where(masked, ce, 0.0)), num_masked),
        "accuracy": _safe_div(jnp.sum(masked & correct, dtype=jnp.int32), num_masked),
        "num_masked": num_masked,
        "num_loss_tokens": num_loss_tokens,
        "weighted_ce_sum": weighted_ce_sum,
        "normalizer": normalizer,
        "aux_loss": jnp.asarray(out.aux_loss, jnp.float32),
        "ar_ce": _safe_div(ar_sum, num_loss_tokens),
    }
    return loss, metrics


def _outputs_at(out: Any, index: np.ndarray) -> Any:
    """The model output with its logits and hidden states [batch, 2L, ...] read at `index` [L]."""
    return out.replace(logits=out.logits[:, index], hidden=out.hidden[:, index])


def left_clean_masked(masked: jnp.ndarray, block_size: int) -> jnp.ndarray:
    """Masked tokens with no masked token before them in their block.

    Args:
      masked: [batch, L] bool, L a multiple of block_size.

    Returns:
      [batch, L] bool.
    """
    rows, L = masked.shape
    m = masked.reshape(rows, L // block_size, block_size).astype(jnp.int32)
    before = jnp.cumsum(m, axis=-1) - m
    return (masked.reshape(m.shape) & (before == 0)).reshape(rows, L)


def _has_predecessor(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """[batch, L] bool: token j - 1 exists and lies in j's packed example."""
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((segment_ids.shape[0], 1), bool), same], axis=1)


def soft_cross_entropy(teacher_next: jnp.ndarray, student: jnp.ndarray) -> jnp.ndarray:
    """-sum_v softmax(teacher at j - 1)_v * log_softmax(student at j)_v per token.

    Args:
      teacher_next: [batch, L, vocab] causal logits (output i predicts token i + 1).
      student: [batch, L, vocab] the student's logits for each token j.

    Returns:
      [batch, L] float32; entry 0 of each row is meaningless (no teacher output before it).
    """
    shifted = jnp.concatenate([teacher_next[:, :1], teacher_next[:, :-1]], axis=1)
    probs = jax.nn.softmax(shifted.astype(jnp.float32), axis=-1)
    return -jnp.sum(probs * jax.nn.log_softmax(student.astype(jnp.float32), axis=-1), axis=-1)


def ar_targets(batch: Mapping[str, jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Next-token targets within each packed segment.

    Position i predicts token i + 1 when both lie in the same (non-padding)
    segment and token i + 1 is a loss_mask token.

    Returns:
      (targets, valid): [batch, seq - 1] int32 and [batch, seq - 1] bool.
    """
    tokens, seg = batch["tokens"], batch["segment_ids"]
    valid = batch["loss_mask"][:, 1:].astype(bool) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    return tokens[:, 1:], valid


def ar_loss(
    apply_fn: ApplyFn, params: Any, batch: Mapping[str, jnp.ndarray],
    token_ce: Callable[[Any, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]] = logits_token_ce,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The autoregressive baseline: causal mask, next-token CE within each segment.

    Args:
      apply_fn: the model function (see the module docstring).
      params: the model parameters.
      batch: the shared batch dict ([batch, L] arrays).
      token_ce: as in `sdar_loss`.

    Returns:
      (loss, metrics): loss is the mean CE over valid targets (see
      `ar_targets`); metrics: loss, ce (= loss), accuracy, num_targets,
      weighted_ce_sum, normalizer, aux_loss.
    """
    _check_batch(batch, "ar_loss")
    seq = batch["tokens"].shape[1]
    if seq < 2:
        raise ValueError(f"ar_loss: sequence length must be at least 2, got {seq}")
    out = apply_fn(
        params, batch["tokens"], batch["positions"],
        mask=MaskSpec("causal"), segment_ids=batch["segment_ids"], logits_slice=(0, seq - 1),
    )
    targets, valid = ar_targets(batch)
    ce, correct = token_ce(out, targets)
    num_targets = valid.sum(dtype=jnp.int32)
    ce_sum = jnp.sum(jnp.where(valid, ce, 0.0))
    loss = _safe_div(ce_sum, num_targets)
    metrics = {
        "loss": loss,
        "ce": loss,
        "accuracy": _safe_div(jnp.sum(valid & correct, dtype=jnp.int32), num_targets),
        "num_targets": num_targets,
        "weighted_ce_sum": ce_sum,
        "normalizer": num_targets,
        "aux_loss": jnp.asarray(out.aux_loss, jnp.float32),
    }
    return loss, metrics
