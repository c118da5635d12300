"""Token proposals from logits: greedy, temperature, top-k, top-p; confidences and entropies.

Every function is pure and jit-compatible. The order of the sampling filters
follows spec §3.6: temperature, then top-k, then top-p, then the draw.

Confidence is the probability of the proposed token under the *unfiltered*
predictive distribution (softmax of `logits / temperature`, or of `logits`
for greedy decoding). The released code measures it on the filtered
distribution, which makes every confidence 1 under top_k=1 and commits a whole
block in one step; sdar_jax does not reproduce that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def entropy(log_probs: jnp.ndarray) -> jnp.ndarray:
    """Entropy in nats of each distribution.

    Args:
      log_probs: [..., vocab] float32 normalised log-probabilities.

    Returns:
      [...] float32.
    """
    probs = jnp.exp(log_probs)
    return -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)


def filter_top_k(logits: jnp.ndarray, k: int) -> jnp.ndarray:
    """Sets every logit below the k-th largest to -inf (ties with it are kept).

    Args:
      logits: [..., vocab] float32.
      k: static int, 0 < k; k >= vocab keeps everything.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def filter_top_p(logits: jnp.ndarray, top_p: jnp.ndarray | float) -> jnp.ndarray:
    """Nucleus filter: keeps the most likely tokens until their mass reaches top_p.

    A token is kept when the mass of the tokens ranked strictly above it is
    below top_p, so the most likely token always survives.

    Args:
      logits: [..., vocab] float32 (may hold -inf from an earlier filter).
      top_p: scalar in (0, 1].
    """
    probs = jax.nn.softmax(logits, axis=-1)
    order = jnp.argsort(-probs, axis=-1, stable=True)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    mass_above = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_above < top_p
    rank = jnp.argsort(order, axis=-1)  # inverse permutation: each token's rank
    keep = jnp.take_along_axis(keep_sorted, rank, axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def propose(
    logits: jnp.ndarray,
    keys: jax.Array | None,
    *,
    temperature: jnp.ndarray | float | None,
    top_k: int = 0,
    top_p: jnp.ndarray | float | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Proposal token, its confidence and the predictive entropy at every position.

    Which code runs is decided by Python values (static under jit): greedy
    when `temperature` is None, a top-k filter when `top_k` > 0, a nucleus
    filter when `top_p` is not None. The temperature and top-p values
    themselves may be traced, so one compilation serves all of them.

    Args:
      logits: [batch, length, vocab] float32.
      keys: [batch] PRNG keys (one per sequence); unused (may be None) when greedy.
      temperature: None for greedy (argmax), else a positive temperature.
      top_k: static int; keep the k most likely tokens, 0 = off.
      top_p: None = off, else keep the smallest set of tokens whose mass
        reaches top_p (the most likely token is always kept).

    Returns:
      tokens: [batch, length] int32 proposals.
      confidence: [batch, length] float32, the proposal's probability under
        the unfiltered predictive distribution (softmax of logits /
        temperature; of the logits when greedy).
      entropy: [batch, length] float32, entropy of that full distribution.
    """
    logits = logits.astype(jnp.float32)
    if temperature is None:
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        if keys is None:
            raise ValueError("propose: sampling with a temperature needs per-sequence keys")
        scaled = logits / temperature
        log_probs = jax.nn.log_softmax(scaled, axis=-1)
        filtered = filter_top_k(scaled, top_k)
        if top_p is not None:
            filtered = filter_top_p(filtered, top_p)
        tokens = jax.vmap(lambda key, row: jax.random.categorical(key, row, axis=-1))(
            keys, filtered
        ).astype(jnp.int32)
    confidence = jnp.exp(jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0])
    return tokens, confidence, entropy(log_probs)
