"""Log-likelihood of a continuation given a context: AR teacher forcing and the block-diffusion ELBO.

Every row is `context + continuation` token ids (right-padded), with its
length and the position of its first continuation token (`cont_start >= 1`:
an empty context is one prefix token, as lm-evaluation-harness does).

AR mode (plain AR checkpoints) is exact: one causal forward, the output at
position j - 1 scores the token at j.

Diffusion mode (SDAR checkpoints) factorises over blocks of B absolute
positions like decoding does: log p(x) = sum_b log p(block b | blocks < b),
and each block's term is bounded below by the masked-diffusion ELBO over the
block's `n_b` continuation positions (context positions of the block stay
clean, as a prompt tail does in decoding):

  ELBO_b = sum over non-empty masks m of the n_b positions of
           S(m) / (|m| * C(n_b, |m|)),   S(m) = sum_{i in m} log p(x_i | x with m masked)

(the continuous-time `E_t [1/t sum_masked log p]`, integrated over t; the
same as LLaDA's `E_l [(n/l) sum_masked log p]` with l uniform in 1..n). The
Monte-Carlo estimate draws, per block independently, l_b uniform in 1..n_b and
a uniform subset of l_b positions, and scores all blocks of a row in one
forward of the training row `[xt ; x0]` (block-diffusion mask: a block sees
its own noisy tokens and the clean past), weighting each masked position by
n_b / l_b; its mean over samples is unbiased for the sum of the ELBO_b.

The checkpoint's `logits_convention` (spec §2.7) decides which output scores
position j: `same_position` the noisy-half output at j; `shifted` the
noisy-half output at j - 1 when j is not the first position of its block, and
the clean-half output at j - 1 (the AR prediction from every earlier block)
when it is.

`score_requests` runs either over many (context, continuation) pairs: rows
go to power-of-two length buckets (one compilation per bucket and batch
size), and each diffusion request is sampled `mc_samples` times with keys
that depend only on the request and sample index.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdar_jax.config import ModelConfig
from sdar_jax.diffusion.noise import diffusion_row
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec

MODES = ("diffusion", "ar")


class ScoreRows(NamedTuple):
    """A padded batch of (context + continuation) rows.

    tokens: [rows, L] int32, row r valid in [0, lengths[r]).
    lengths: [rows] int32.
    cont_start: [rows] int32, first continuation position, in [1, lengths[r]).
    """

    tokens: jnp.ndarray
    lengths: jnp.ndarray
    cont_start: jnp.ndarray


class Score(NamedTuple):
    """One request's result.

    logprob: the log-likelihood (AR) or its ELBO estimate (diffusion), nats.
    is_greedy: whether every continuation token is the argmax of its
      prediction (AR: teacher forced; diffusion: with all of each block's
      continuation positions masked).
    stderr: standard error of the Monte-Carlo mean (0 in AR mode or with one sample).
    """

    logprob: float
    is_greedy: bool
    stderr: float


@dataclasses.dataclass(frozen=True)
class LikelihoodSettings:
    """How `score_requests` scores.

    Attributes:
      mode: "diffusion" (ELBO) or "ar" (teacher forcing).
      block_length: B of the block-diffusion mask (diffusion).
      mc_samples: Monte-Carlo mask samples per request (diffusion).
      batch_size: rows per forward.
      seed: PRNG seed of the mask samples.
    """

    mode: str = "diffusion"
    block_length: int = 4
    mc_samples: int = 16
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"LikelihoodSettings.mode {self.mode!r} is unknown; expected one of {MODES}")
        for name in ("block_length", "mc_samples", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LikelihoodSettings.{name} must be an int >= 1, got {value!r}")


def continuation_mask(rows: ScoreRows) -> jnp.ndarray:
    """[rows, L] bool: the continuation positions (cont_start <= j < length)."""
    pos = jnp.arange(rows.tokens.shape[1])[None]
    return (pos >= rows.cont_start[:, None]) & (pos < rows.lengths[:, None])


def _blocks(x: jnp.ndarray, block_size: int) -> jnp.ndarray:
    """[rows, L] -> [rows, L // B, B] (L a multiple of B)."""
    return x.reshape(x.shape[0], -1, block_size)


def sample_block_masks(keys: jax.Array, rows: ScoreRows, block_size: int) -> jnp.ndarray:
    """Per row and block: l_b uniform in 1..n_b, then a uniform subset of l_b continuation positions.

    Args:
      keys: [rows] PRNG keys.
      rows: the batch (L a multiple of block_size).
      block_size: B.

    Returns:
      [rows, L] bool masked positions (only continuation positions; every
      block holding n_b >= 1 of them has 1..n_b masked).
    """
    eligible = _blocks(continuation_mask(rows), block_size)  # [rows, blocks, B]

    def one(key, eligible_row):
        k_count, k_order = jax.random.split(key)
        n = eligible_row.sum(-1)  # [blocks]
        u = jax.random.uniform(k_count, n.shape)
        count = jnp.minimum(jnp.floor(u * n).astype(jnp.int32) + 1, n)
        order = jnp.where(eligible_row, jax.random.uniform(k_order, eligible_row.shape), 2.0)
        rank = jnp.argsort(jnp.argsort(order, axis=-1), axis=-1)  # 0 = first eligible drawn
        return eligible_row & (rank < count[:, None])

    return jax.vmap(one)(keys, eligible).reshape(rows.tokens.shape)


def elbo_weights(masked: jnp.ndarray, eligible: jnp.ndarray, block_size: int) -> jnp.ndarray:
    """[rows, L] float32: n_b / l_b at masked continuation positions of block b, else 0."""
    m = _blocks(masked & eligible, block_size)
    n = _blocks(eligible, block_size).sum(-1, keepdims=True)
    count = m.sum(-1, keepdims=True)
    w = jnp.where(m, n / jnp.maximum(count, 1), 0.0).astype(jnp.float32)
    return w.reshape(masked.shape)


def _token_logprobs(logits: jnp.ndarray, targets: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """log_softmax(logits)[target] and argmax hits; [rows, L, V], [rows, L] -> [rows, L] x2."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def diffusion_position_logprobs(params: Any, config: ModelConfig, rows: ScoreRows,
                                masked: jnp.ndarray, block_size: int
                                ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """log p(x_j | ...) and argmax hits of every position under one mask pattern.

    One forward of `[xt ; x0]` (xt: x0 with `masked` replaced by the mask
    token) with the block-diffusion mask; padding is a separate segment.
    Which output scores position j follows `config.logits_convention`.

    Args:
      params, config: the model.
      rows: the batch (L a multiple of block_size).
      masked: [rows, L] bool.
      block_size: B.

    Returns:
      ([rows, L] float32 log-probs, [rows, L] bool hits); position 0 (never a
      continuation position) holds junk under `shifted`.
    """
    x0 = rows.tokens
    seq = x0.shape[1]
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None], x0.shape)
    valid = pos < rows.lengths[:, None]
    xt = jnp.where(masked, jnp.int32(config.mask_token_id), x0)
    tokens, positions, segments = diffusion_row(xt, x0, pos, valid.astype(jnp.int32))
    out = transformer.apply(config, params, tokens, positions,
                            mask=MaskSpec("block_diffusion", block_size, config.causal_in_block),
                            segment_ids=segments,
                            logits_slice=(0, 2 * seq if config.logits_convention == "shifted" else seq))
    if config.logits_convention == "same_position":
        return _token_logprobs(out.logits, x0)
    noisy, clean = out.logits[:, :seq], out.logits[:, seq:]
    # The output at j scores j + 1: the clean half's where j + 1 starts a block.
    last_of_block = ((jnp.arange(seq) + 1) % block_size == 0)[None, :, None]
    predecessor = jnp.where(last_of_block, clean, noisy)
    shifted = jnp.concatenate([predecessor[:, :1], predecessor[:, :-1]], axis=1)
    return _token_logprobs(shifted, x0)


@functools.partial(jax.jit, static_argnames=("config", "block_size"))
def diffusion_scores(params: Any, rows: ScoreRows, masked: jnp.ndarray, *, config: ModelConfig,
                     block_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One ELBO sample per row under `masked`, and whether every masked position is an argmax hit.

    Returns:
      ([rows] float32 sum_b (n_b / l_b) sum_{i in m_b} log p(x_i | ...),
       [rows] bool all masked continuation positions argmax hits).
    """
    eligible = continuation_mask(rows)
    logp, hit = diffusion_position_logprobs(params, config, rows, masked, block_size)
    weights = elbo_weights(masked, eligible, block_size)
    scored = masked & eligible
    return jnp.sum(weights * logp, axis=-1), jnp.all(hit | ~scored, axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "block_size"))
def sampled_diffusion_scores(params: Any, rows: ScoreRows, keys: jax.Array, *, config: ModelConfig,
                             block_size: int) -> jnp.ndarray:
    """[rows] one Monte-Carlo ELBO sample per row (masks from `sample_block_masks(keys)`)."""
    masked = sample_block_masks(keys, rows, block_size)
    return diffusion_scores(params, rows, masked, config=config, block_size=block_size)[0]


@functools.partial(jax.jit, static_argnames=("config",))
def ar_scores(params: Any, rows: ScoreRows, *, config: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Exact teacher-forced log-likelihood of each row's continuation (causal mask).

    Returns:
      ([rows] float32 sum over continuation j of log p(x_j | x_<j),
       [rows] bool every continuation token the argmax).
    """
    x0 = rows.tokens
    seq = x0.shape[1]
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None], x0.shape)
    out = transformer.apply(config, params, x0, pos, mask=MaskSpec("causal"),
                            segment_ids=(pos < rows.lengths[:, None]).astype(jnp.int32),
                            logits_slice=(0, seq - 1))
    logp, hit = _token_logprobs(out.logits, x0[:, 1:])
    scored = continuation_mask(rows)[:, 1:]
    return jnp.sum(jnp.where(scored, logp, 0.0), axis=-1), jnp.all(hit | ~scored, axis=-1)


# ---- host side: many requests -----------------------------------------------------------------

def bucket_length(length: int, multiple: int) -> int:
    """The padded row length of a `length`-token row: a power of two >= 8, then a multiple of `multiple`."""
    padded = max(8, 1 << (int(length) - 1).bit_length())
    return -(-padded // multiple) * multiple


def _check_request(i: int, context: Sequence[int], continuation: Sequence[int], max_length: int) -> None:
    if not context:
        raise ValueError(f"loglikelihood request {i}: empty context; pass at least a prefix token")
    if not continuation:
        raise ValueError(f"loglikelihood request {i}: empty continuation (nothing to score)")
    total = len(context) + len(continuation)
    if total > max_length:
        raise ValueError(f"loglikelihood request {i}: context {len(context)} + continuation "
                         f"{len(continuation)} tokens exceed the model's {max_length} positions")


def _row_arrays(items: Sequence[tuple[Sequence[int], Sequence[int]]], size: int, seq: int,
                pad_id: int) -> ScoreRows:
    tokens = np.full((size, seq), pad_id, np.int32)
    lengths = np.ones((size,), np.int32)
    starts = np.zeros((size,), np.int32)
    for r in range(size):
        context, continuation = items[min(r, len(items) - 1)]  # padding rows repeat the last
        ids = list(context) + list(continuation)
        tokens[r, :len(ids)] = ids
        lengths[r], starts[r] = len(ids), len(context)
    return ScoreRows(jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(starts))


def _keys(seed: int, request: np.ndarray, sample: np.ndarray) -> jax.Array:
    base = jax.random.key(seed)
    return jax.vmap(lambda r, s: jax.random.fold_in(jax.random.fold_in(base, r), s))(
        jnp.asarray(request, jnp.int32), jnp.asarray(sample, jnp.int32))


def score_requests(params: Any, config: ModelConfig,
                   requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   settings: LikelihoodSettings, pad_id: int = 0) -> list[Score]:
    """Scores (context ids, continuation ids) pairs; results in request order.

    Diffusion mode needs a checkpoint with a mask token. Requests longer than
    `config.max_position_embeddings` are an error, never truncated.
    """
    if settings.mode == "diffusion" and config.mask_token_id is None:
        raise ValueError("diffusion log-likelihood needs a checkpoint with mask_token_id (an SDAR "
                         "model); this one has none: use mode 'ar'")
    for i, (context, continuation) in enumerate(requests):
        _check_request(i, context, continuation, config.max_position_embeddings)
    multiple = settings.block_length if settings.mode == "diffusion" else 1
    by_bucket: dict[int, list[int]] = {}
    for i, (context, continuation) in enumerate(requests):
        by_bucket.setdefault(bucket_length(len(context) + len(continuation), multiple), []).append(i)
    logprob = np.zeros((len(requests),), np.float64)
    greedy = np.zeros((len(requests),), bool)
    samples = np.zeros((len(requests), settings.mc_samples), np.float64)
    size = settings.batch_size
    cap = -(-config.max_position_embeddings // multiple) * multiple
    for seq, members in sorted(by_bucket.items()):
        seq = min(seq, cap)
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            rows = _row_arrays([requests[i] for i in chunk], size, seq, pad_id)
            if settings.mode == "ar":
                lp, hit = jax.device_get(ar_scores(params, rows, config=config))
                logprob[chunk] = lp[:len(chunk)]
            else:
                _, hit = jax.device_get(diffusion_scores(
                    params, rows, continuation_mask(rows), config=config,
                    block_size=settings.block_length))
            greedy[chunk] = hit[:len(chunk)]
        if settings.mode == "ar":
            continue
        # Every (request, sample) pair is a row, so few requests still fill the batches.
        pairs = [(i, s) for i in members for s in range(settings.mc_samples)]
        for start in range(0, len(pairs), size):
            chunk = pairs[start:start + size]
            padded = chunk + [chunk[-1]] * (size - len(chunk))
            rows = _row_arrays([requests[i] for i, _ in chunk], size, seq, pad_id)
            keys = _keys(settings.seed, np.asarray([i for i, _ in padded]),
                         np.asarray([s for _, s in padded]))
            values = jax.device_get(sampled_diffusion_scores(
                params, rows, keys, config=config, block_size=settings.block_length))
            for (i, s), v in zip(chunk, values):
                samples[i, s] = v
    stderr = np.zeros((len(requests),), np.float64)
    if settings.mode == "diffusion":
        logprob = samples.mean(-1)
        if settings.mc_samples > 1:
            stderr = samples.std(-1, ddof=1) / math.sqrt(settings.mc_samples)
    return [Score(float(lp), bool(g), float(e)) for lp, g, e in zip(logprob, greedy, stderr)]
