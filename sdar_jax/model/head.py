"""The model's output head as a plain matrix, and its tiled cross entropy.

`chunked_token_ce(config, params)` is a drop-in for the losses' `token_ce`
argument (`sdar_jax.diffusion.loss`): it reads the final hidden states of a
`ModelOutput` and computes per-token cross entropy tile by tile
(`sdar_jax.ops.cross_entropy`), so under jit the model's whole-row logits are
dead code and never materialised.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from sdar_jax.config import ModelConfig
from sdar_jax.model.layers import dtype_of
from sdar_jax.ops.cross_entropy import DEFAULT_CHUNK_SIZE, head_cross_entropy

# (model output with `.hidden` [batch, seq, hidden], targets [batch, seq]) -> (ce, correct)
TokenCE = Callable[[Any, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]


def head_matrix(config: ModelConfig, params: dict) -> tuple[jnp.ndarray, bool]:
    """(the head, vocab_major): `lm_head/kernel` [hidden, vocab], or the tied
    `embed_tokens/embedding` [vocab, hidden] (vocab_major True)."""
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"], True
    return params["lm_head"]["kernel"], False


def chunked_token_ce(config: ModelConfig, params: dict, chunk_size: int = DEFAULT_CHUNK_SIZE) -> TokenCE:
    """Per-token CE and hits from `out.hidden` and the params' head, `chunk_size` positions at a time."""
    head, vocab_major = head_matrix(config, params)
    dtype = dtype_of(config.dtype)

    def token_ce(out: Any, targets: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        return head_cross_entropy(
            out.hidden, head, targets, dtype=dtype, vocab_major=vocab_major, chunk_size=chunk_size
        )

    return token_ce
