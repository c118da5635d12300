"""Block-diffusion and autoregressive decoding in one jitted function (spec §3).

`generate` prefills the prompt, then runs a `lax.while_loop` over blocks that
holds a `lax.while_loop` over denoising steps, with a static KV cache
`[layers, batch, max_len, kv_heads, head_dim]`; nothing is dispatched from
Python per block or per step.

Diffusion mode (SDAR checkpoints), per row r with prompt length P_r:
  * the prompt's whole blocks (positions < (P_r // B) * B) are prefilled with
    the block-causal mask;
  * the first decoded block starts at (P_r // B) * B and keeps the prompt's
    tail; blocks follow each row's own absolute positions, so a row decodes
    exactly as it would alone;
  * each step runs the block's B tokens against the cache (block-causal mask:
    the past and the block itself), proposes a token per position and lets the
    strategy commit some still-masked ones; the loop ends when no row has a
    masked position left; the finished block's keys and values are written
    into the cache by the next block's first forward, which runs
    [finished block ; new block] (2B tokens) instead of spec §3.3's separate
    pass (same cache contents, one forward less per block);
  * after each block, a row whose generated part holds a stop id is finished
    and frozen; so is a row whose canvas (ceil((P_r + G) / B) blocks) is full;
  * logits conventions (spec §2.7, `ModelConfig.logits_convention`): with
    "same_position" output j gives position j's proposal; with "shifted"
    output j - 1 does. A block's first position is then predicted by the
    previous block's last output in the fused [previous ; block] pass (for the
    first decoded block too, re-running the last prompt block, so a prompt
    ending on a boundary gets the AR prediction of its last token); that
    proposal is kept for the block's later steps, whose B-token forwards
    cannot see it.
  * sampling keys: step s of the row's k-th decoded block draws with
    fold_in(fold_in(row key, k), s) over the block's [B, vocab] logits.
AR mode (plain Qwen3 checkpoints): next-token prediction with the causal mask
and the same cache, one token per forward.

Static (compile-time) choices are the mode, block length, greedy or sampled,
top-k, whether top-p is on, max_new_tokens, the number of stop ids, and
whether the strategy is a staged one (SAID: its stage count too). The
per-step strategy (a traced index into a `lax.switch`), the step count,
thresholds, temperature, top-p value and stop ids are traced, so changing
them does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdar_jax import parallel
from sdar_jax.config import ModelConfig
from sdar_jax.decode import said, sampling, strategies
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec

MODES = ("diffusion", "ar")
PAD_ID = -1  # fills `DecodeResult.tokens` after each row's length


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Every decoding knob.

    Attributes:
      mode: "diffusion" (block diffusion, SDAR checkpoints) or "ar" (next-token
        prediction, plain AR checkpoints).
      block_length: B, positions per block (diffusion).
      steps: S, denoising steps per block (spec §3.4 schedule); for said /
        said_chlg the per-block step budget T. Ignored by entropy_bounded,
        which commits at least one position per step.
      strategy: one of `strategies.STRATEGY_NAMES`.
      threshold: confidence threshold of low_confidence_dynamic, in (0, 1].
      eb_bound: entropy bound (nats) of entropy_bounded, > 0.
      temperature: 0 for greedy decoding.
      top_k: 0 disables; top_p: 1 disables.
      max_new_tokens: G.
      stop_ids: token ids that end a sequence (checked after each block).
      said_stages: K, number of SAID stages.
      said_rec_steps: steps of SAID's reconstruction stage.
      said_threshold: optional dynamic threshold inside SAID stages.
      chlg_threshold: tau, CHLG's commit-at-once confidence.
      chlg_extra_steps: CHLG's extra steps for the positions below tau.
    """

    mode: str = "diffusion"
    block_length: int = 4
    steps: int = 4
    strategy: str = "low_confidence_dynamic"
    threshold: float = 0.95
    eb_bound: float = 0.1
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_ids: tuple[int, ...] = ()
    said_stages: int = 2
    said_rec_steps: int = 1
    said_threshold: float | None = None
    chlg_threshold: float = 0.8
    chlg_extra_steps: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        if self.mode not in MODES:
            raise ValueError(f"DecodeConfig.mode {self.mode!r} is unknown; expected one of {MODES}")
        if self.strategy not in strategies.STRATEGY_NAMES:
            raise ValueError(
                f"unknown strategy {self.strategy!r}; expected one of {strategies.STRATEGY_NAMES}"
            )
        _check_int("block_length", self.block_length, 1)
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_int("steps", self.steps, 1)
        if self.strategy not in strategies.STAGED_STRATEGIES and self.steps > self.block_length:
            raise ValueError(
                f"DecodeConfig.steps must be in [1, block_length={self.block_length}], "
                f"got {self.steps}"
            )
        for name in ("threshold", "chlg_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"DecodeConfig.{name} must be in (0, 1], got {getattr(self, name)!r}")
        if self.said_threshold is not None and not 0.0 < self.said_threshold <= 1.0:
            raise ValueError(
                f"DecodeConfig.said_threshold must be in (0, 1] or None, got {self.said_threshold!r}"
            )
        if not self.eb_bound > 0.0:
            raise ValueError(f"DecodeConfig.eb_bound must be > 0, got {self.eb_bound!r}")
        if any(i < 0 for i in self.stop_ids):
            raise ValueError(f"DecodeConfig.stop_ids must be token ids >= 0, got {self.stop_ids}")
        _check_int("chlg_extra_steps", self.chlg_extra_steps, 1)
        if not self.temperature >= 0.0:
            raise ValueError(f"DecodeConfig.temperature must be >= 0, got {self.temperature!r}")
        _check_int("top_k", self.top_k, 0)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"DecodeConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if self.mode == "diffusion" and self.strategy in strategies.STAGED_STRATEGIES:
            self.said_steps_per_stage  # validates the stage split

    @property
    def said_steps_per_stage(self) -> tuple[int, ...]:
        """The SAID budget split over stages (said / said_chlg only)."""
        chlg = self.strategy == "said_chlg"
        rec = 1 + self.chlg_extra_steps if chlg else self.said_rec_steps
        return said.stage_steps(
            self.block_length, self.said_stages, self.steps, rec, rec_capped=not chlg
        )


def _check_int(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"DecodeConfig.{name} must be an int >= {minimum}, got {value!r}")


class DecodeResult(NamedTuple):
    """What `generate` returns (all jax arrays).

    tokens: [batch, max_new_tokens] int32, the generated tokens up to and
      including the first stop id, then PAD_ID.
    lengths: [batch] int32, valid entries of `tokens`.
    canvas: [batch, canvas_len] int32, prompt and every decoded position.
    num_forwards: [batch] int32, denoising forwards the row took part in (no
      prefill or cache-commit passes).
    num_committed: [batch] int32, positions the row committed.
    tokens_per_forward: [batch] float32, num_committed / num_forwards.
    steps_per_block: [batch, max_blocks] int32, forwards spent on each of the
      row's blocks (0 past its last block); in AR mode one entry per token.
    batch_forwards: int32 scalar, denoising forwards the batch ran.
    """

    tokens: jnp.ndarray
    lengths: jnp.ndarray
    canvas: jnp.ndarray
    num_forwards: jnp.ndarray
    num_committed: jnp.ndarray
    tokens_per_forward: jnp.ndarray
    steps_per_block: jnp.ndarray
    batch_forwards: jnp.ndarray


class _Static(NamedTuple):
    """The compile-time part of a DecodeConfig (hashable).

    `staged` is "said" or "said_chlg" for the staged strategies and None for
    the per-step ones, which share one compilation (selected by a traced index).
    """

    mode: str
    block_length: int
    staged: str | None
    greedy: bool
    top_k: int
    use_top_p: bool
    max_new_tokens: int
    said_stages: int
    said_dynamic: bool


def _split(dc: DecodeConfig) -> tuple[_Static, dict[str, jnp.ndarray]]:
    """Separates compile-time choices from traced numbers."""
    staged = dc.mode == "diffusion" and dc.strategy in strategies.STAGED_STRATEGIES
    static = _Static(
        mode=dc.mode,
        block_length=dc.block_length if dc.mode == "diffusion" else 1,
        staged=dc.strategy if staged else None,
        # Only the filter structure is static; temperature and top-p values are knobs.
        greedy=dc.temperature == 0.0,
        top_k=dc.top_k,
        use_top_p=dc.top_p < 1.0,
        max_new_tokens=dc.max_new_tokens,
        said_stages=dc.said_stages if staged else 1,
        said_dynamic=dc.said_threshold is not None,
    )
    knobs = dict(
        strategy=jnp.int32(
            0 if staged else tuple(strategies.STRATEGIES).index(dc.strategy)
        ),
        steps=jnp.int32(dc.steps),
        threshold=jnp.float32(dc.threshold),
        eb_bound=jnp.float32(dc.eb_bound),
        temperature=jnp.float32(dc.temperature),
        top_p=jnp.float32(dc.top_p),
        stop_ids=jnp.asarray(dc.stop_ids, jnp.int32).reshape(len(dc.stop_ids)),
        steps_per_stage=jnp.asarray(dc.said_steps_per_stage if staged else (dc.steps,), jnp.int32),
        said_threshold=jnp.float32(dc.said_threshold or 1.0),
        chlg_threshold=jnp.float32(dc.chlg_threshold),
        chlg_extra_steps=jnp.int32(dc.chlg_extra_steps),
    )
    return static, knobs


def canvas_length(max_prompt: int, decode_config: DecodeConfig) -> int:
    """Static canvas (and KV cache) length for a prompt bucket."""
    total = max_prompt + decode_config.max_new_tokens
    if decode_config.mode == "ar":
        return total
    b = decode_config.block_length
    return -(-total // b) * b


def _row_keys(rng: jax.Array, batch: int) -> jax.Array:
    """[batch] typed PRNG keys from one key (split) or from [batch] keys."""
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.shape == ():
        return jax.random.split(rng, batch)
    if rng.shape != (batch,):
        raise ValueError(f"rng must be one key or [batch={batch}] keys, got shape {rng.shape}")
    return rng


def generate(
    params: dict,
    config: ModelConfig,
    prompt_tokens: jnp.ndarray,
    prompt_lengths: jnp.ndarray,
    rng: jax.Array,
    decode_config: DecodeConfig,
    stream: Callable[..., None] | None = None,
) -> DecodeResult:
    """Decodes a batch of (right-padded) prompts.

    Args:
      params: the model's param pytree.
      config: the model config.
      prompt_tokens: [batch, max_prompt] int32, row r valid in [0, P_r).
      prompt_lengths: [batch] int32 P_r, 1 <= P_r <= max_prompt.
      rng: one PRNG key (split per row) or [batch] keys (one per sequence, so a
        sampled sequence does not depend on its batch mates). Unused when
        greedy.
      decode_config: the decoding knobs.
      stream: optional host callback `stream(block_index, block_tokens,
        block_start, active)` called after each block (each token in AR mode)
        with [batch, B] tokens, [batch] start positions and [batch] bool rows
        that decoded it. It is a static argument: pass the same function to
        reuse the compilation.

    Returns:
      DecodeResult.
    """
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    if prompt_tokens.ndim != 2 or prompt_lengths.shape != prompt_tokens.shape[:1]:
        raise ValueError(
            f"prompt_tokens must be [batch, max_prompt] and prompt_lengths [batch]; got "
            f"{prompt_tokens.shape} and {prompt_lengths.shape}"
        )
    if not isinstance(prompt_lengths, jax.core.Tracer):
        lengths = np.asarray(prompt_lengths)
        if lengths.min() < 1 or lengths.max() > prompt_tokens.shape[1]:
            raise ValueError(
                f"prompt_lengths must be in [1, {prompt_tokens.shape[1]}] (empty prompts cannot "
                f"be decoded); got {lengths.tolist()}"
            )
    if decode_config.mode == "diffusion" and config.mask_token_id is None:
        raise ValueError(
            "mode 'diffusion' needs a checkpoint with mask_token_id (an SDAR model); this config "
            "has none: use mode 'ar'"
        )
    total = canvas_length(prompt_tokens.shape[1], decode_config)
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt length {prompt_tokens.shape[1]} + max_new_tokens "
            f"{decode_config.max_new_tokens} needs {total} positions, beyond the model's "
            f"max_position_embeddings {config.max_position_embeddings}"
        )
    static, knobs = _split(decode_config)
    keys = _row_keys(rng, prompt_tokens.shape[0])
    return _generate(
        params, prompt_tokens, prompt_lengths, keys, knobs,
        config=config, static=static, stream=stream,
    )


@functools.partial(jax.jit, static_argnames=("config", "static", "stream"))
def _generate(params, prompt_tokens, prompt_lengths, keys, knobs, *, config, static, stream):
    if static.mode == "ar":
        return _generate_ar(params, prompt_tokens, prompt_lengths, keys, knobs, config, static, stream)
    return _generate_diffusion(
        params, prompt_tokens, prompt_lengths, keys, knobs, config, static, stream
    )


def _forward(config, params, tokens, positions, mask, cache, logits_slice=None):
    """One cached model call; returns (logits [batch, len', vocab] float32, cache).

    `logits_slice` (start, stop) computes the head only there; (0, 0) skips it.
    """
    out = transformer.apply(
        config, params, tokens, positions, mask=mask, cache=cache, logits_slice=logits_slice
    )
    return out.logits, out.cache


def _is_stop(tokens: jnp.ndarray, stop_ids: jnp.ndarray) -> jnp.ndarray:
    """Whether each token is one of stop_ids ([n] int32, possibly empty)."""
    return jnp.any(tokens[..., None] == stop_ids, axis=-1)


def _finish(
    canvas, prompt_lengths, forwards, committed, steps_per_block, batch_forwards, static, stop_ids
):
    """Cuts each row's generated part at its first stop id and packs the result."""
    g = static.max_new_tokens
    offsets = jnp.arange(g, dtype=jnp.int32)
    generated = jnp.take_along_axis(canvas, prompt_lengths[:, None] + offsets, axis=1)
    stops = _is_stop(generated, stop_ids)
    lengths = jnp.where(stops.any(-1), jnp.argmax(stops, axis=-1) + 1, g).astype(jnp.int32)
    tokens = jnp.where(offsets[None] < lengths[:, None], generated, PAD_ID)
    tpf = committed.astype(jnp.float32) / jnp.maximum(forwards, 1).astype(jnp.float32)
    return DecodeResult(
        tokens=tokens, lengths=lengths, canvas=canvas, num_forwards=forwards,
        num_committed=committed, tokens_per_forward=tpf, steps_per_block=steps_per_block,
        batch_forwards=batch_forwards,
    )


def _propose(static, knobs, logits, keys):
    return sampling.propose(
        logits, keys, temperature=None if static.greedy else knobs["temperature"],
        top_k=static.top_k, top_p=knobs["top_p"] if static.use_top_p else None,
    )


def _select(static, knobs, confidence, entropy, masked, step, stage_done):
    """The strategy's commit mask for one step; updates SAID's per-stage counters."""
    if static.staged is not None:
        commit, stage = said.said_select(
            confidence, masked, stage_done,
            stage_of=said.stage_partition(static.block_length, static.said_stages),
            steps_per_stage=knobs["steps_per_stage"],
            threshold=knobs["said_threshold"] if static.said_dynamic else None,
            chlg_threshold=knobs["chlg_threshold"] if static.staged == "said_chlg" else None,
            chlg_extra_steps=knobs["chlg_extra_steps"],
        )
        took_step = masked.any(-1)
        stage_done = stage_done + (
            took_step[:, None] & (jnp.arange(static.said_stages)[None] == stage[:, None])
        )
        return commit, stage_done
    count = strategies.step_count(step, knobs["steps"], static.block_length)
    inputs = strategies.StepInputs(
        confidence=confidence, entropy=entropy, masked=masked,
        count=jnp.broadcast_to(count, masked.shape[:1]),
        threshold=knobs["threshold"], eb_bound=knobs["eb_bound"],
    )
    commit = jax.lax.switch(knobs["strategy"], tuple(strategies.STRATEGIES.values()), inputs)
    return commit & masked, stage_done


class _StepState(NamedTuple):
    """The denoising-step loop's state for one block (all rows).

    first: ([batch] int32 token, [batch] float32 confidence, [batch] float32
      entropy) of position 0's proposal at the block's first step (kept for the
      whole block under the shifted convention).
    """

    step: jnp.ndarray
    block: jnp.ndarray
    masked: jnp.ndarray
    cache: transformer.KVCache
    stage_done: jnp.ndarray
    first: tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]
    block_forwards: jnp.ndarray
    n_committed: jnp.ndarray


def _previous_block(canvas, positions, b, mask_id):
    """Positions [batch, B] and tokens of the block before each row's block at `positions`.

    A row whose block starts at 0 has none: it gets mask tokens at the next
    block's positions instead, slots nothing can see yet and its next block
    overwrites (past the canvas, the cache write is dropped).
    """
    has_previous = positions[:, :1] >= b
    previous_positions = jnp.where(has_previous, positions - b, positions + b)
    tokens = jnp.take_along_axis(canvas, jnp.minimum(previous_positions, canvas.shape[1] - 1), axis=1)
    return previous_positions, jnp.where(has_previous, tokens, mask_id)


def _generate_diffusion(params, prompt_tokens, prompt_lengths, keys, knobs, config, static, stream):
    b = static.block_length
    g = static.max_new_tokens
    shifted = config.logits_convention == "shifted"
    batch, max_prompt = prompt_tokens.shape
    canvas_len = -(-(max_prompt + g) // b) * b
    max_blocks = min(-(-g // b) + 1, canvas_len // b)
    mask_id = config.mask_token_id
    block_mask = MaskSpec("block_causal", b)
    offsets = jnp.arange(b, dtype=jnp.int32)

    pos = jnp.arange(canvas_len, dtype=jnp.int32)
    padded = jnp.pad(prompt_tokens, ((0, 0), (0, canvas_len - max_prompt)))
    canvas = jnp.where(pos[None] < prompt_lengths[:, None], padded, mask_id)
    first_start = (prompt_lengths // b) * b
    num_blocks = (-(-(prompt_lengths + g) // b) * b - first_start) // b

    cache = parallel.constrain_cache(transformer.init_cache(config, batch, canvas_len))
    prefill_len = (max_prompt // b) * b
    if prefill_len:
        # Rows' positions past their own whole blocks hold junk here; each block's
        # first forward overwrites its slots before attending, and the block-causal
        # mask hides later slots.
        prefill_pos = jnp.broadcast_to(pos[:prefill_len], (batch, prefill_len))
        _, cache = _forward(
            config, params, canvas[:, :prefill_len], prefill_pos, block_mask, cache, (0, 0)
        )

    def block_body(state):
        k, canvas, cache, finished, forwards, committed, steps_per_block, batch_forwards = state
        active = ~finished
        start = jnp.minimum(first_start + k * b, canvas_len - b)
        positions = start[:, None] + offsets[None]
        block = jnp.take_along_axis(canvas, positions, axis=1)
        masked0 = active[:, None] & (positions >= prompt_lengths[:, None])
        block = jnp.where(masked0, mask_id, block)
        block_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, k)
        previous_positions, previous_block = _previous_block(canvas, positions, b, mask_id)

        def denoise(block, cache):
            if not shifted:
                return _forward(config, params, block, positions, block_mask, cache)
            # Output j - 1 predicts position j; position 0's proposal is kept
            # from the block's first step (the placeholder row is overridden).
            logits, cache = _forward(config, params, block, positions, block_mask, cache, (0, b - 1))
            placeholder = jnp.zeros((batch, 1, logits.shape[-1]), logits.dtype)
            return jnp.concatenate([placeholder, logits], axis=1), cache

        def commit_previous_and_denoise(block, cache):
            # [previous block ; this block] in one call. The previous (finished)
            # block's queries see exactly what a separate commit pass would show
            # them (the past and their own block), so its keys and values are the
            # ones spec §3.3's extra pass writes; this block then attends to them.
            # Shifted: the previous block's last output predicts position 0.
            tokens = jnp.concatenate([previous_block, block], axis=1)
            both = jnp.concatenate([previous_positions, positions], axis=1)
            head = (b - 1, 2 * b - 1) if shifted else (b, 2 * b)
            return _forward(config, params, tokens, both, block_mask, cache, head)

        def step_cond(inner):
            return (inner.step < b) & jnp.any(inner.masked)

        def step_body(inner):
            s = inner.step
            # Shifted: position 0 is predicted only in the pass that writes the
            # previous block (for the first block too, from its prompt block).
            first_pass = (s == 0) & ((k > 0) | shifted)
            logits, cache = jax.lax.cond(
                first_pass, commit_previous_and_denoise, denoise, inner.block, inner.cache
            )
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(block_keys, s)
            proposals, confidence, entropy = _propose(static, knobs, logits, step_keys)
            first = jax.tree.map(
                lambda new, kept: jnp.where(s == 0, new[:, 0], kept),
                (proposals, confidence, entropy), inner.first,
            )
            if shifted:
                proposals, confidence, entropy = (
                    x.at[:, 0].set(f) for x, f in zip((proposals, confidence, entropy), first)
                )
            commit, stage_done = _select(
                static, knobs, confidence, entropy, inner.masked, s, inner.stage_done
            )
            took_step = inner.masked.any(-1)
            return _StepState(
                step=s + 1,
                block=jnp.where(commit, proposals, inner.block),
                masked=inner.masked & ~commit,
                cache=cache,
                stage_done=stage_done,
                first=first,
                block_forwards=inner.block_forwards + took_step,
                n_committed=inner.n_committed + commit.sum(-1),
            )

        zeros = jnp.zeros((batch,), jnp.int32)
        inner = _StepState(
            step=jnp.int32(0), block=block, masked=masked0, cache=cache,
            stage_done=jnp.zeros((batch, static.said_stages), jnp.int32),
            first=(zeros, zeros.astype(jnp.float32), zeros.astype(jnp.float32)),
            block_forwards=zeros, n_committed=zeros,
        )
        inner = jax.lax.while_loop(step_cond, step_body, inner)
        s, block, cache = inner.step, inner.block, inner.cache
        block_forwards, n_committed = inner.block_forwards, inner.n_committed
        rows = jnp.arange(batch)[:, None]
        canvas = canvas.at[rows, positions].set(block)
        generated = (positions >= prompt_lengths[:, None]) & (
            positions < (prompt_lengths + g)[:, None]
        )
        stopped = jnp.any(_is_stop(block, knobs["stop_ids"]) & generated, axis=-1)
        if stream is not None:
            jax.debug.callback(stream, k, block, start, active, ordered=True)
        finished = finished | (active & (stopped | (k + 1 >= num_blocks)))
        steps_per_block = steps_per_block.at[:, k].set(block_forwards)
        return (
            k + 1, canvas, cache, finished, forwards + block_forwards, committed + n_committed,
            steps_per_block, batch_forwards + s,
        )

    def block_cond(state):
        k, _, _, finished, *_ = state
        return (k < max_blocks) & ~jnp.all(finished)

    zeros = jnp.zeros((batch,), jnp.int32)
    state = (
        jnp.int32(0), canvas, cache, jnp.zeros((batch,), bool), zeros, zeros,
        jnp.zeros((batch, max_blocks), jnp.int32), jnp.int32(0),
    )
    _, canvas, _, _, forwards, committed, steps_per_block, batch_forwards = jax.lax.while_loop(
        block_cond, block_body, state
    )
    return _finish(
        canvas, prompt_lengths, forwards, committed, steps_per_block, batch_forwards, static,
        knobs["stop_ids"],
    )


def _generate_ar(params, prompt_tokens, prompt_lengths, keys, knobs, config, static, stream):
    g = static.max_new_tokens
    batch, max_prompt = prompt_tokens.shape
    canvas_len = max_prompt + g
    causal = MaskSpec("causal")
    pos = jnp.arange(canvas_len, dtype=jnp.int32)
    canvas = jnp.pad(prompt_tokens, ((0, 0), (0, g)))
    canvas = jnp.where(pos[None] < prompt_lengths[:, None], canvas, 0)

    cache = parallel.constrain_cache(transformer.init_cache(config, batch, canvas_len))
    prefill_len = max_prompt - 1
    if prefill_len:
        # Positions at or past a row's last prompt token are rewritten before use.
        prefill_pos = jnp.broadcast_to(pos[:prefill_len], (batch, prefill_len))
        _, cache = _forward(
            config, params, canvas[:, :prefill_len], prefill_pos, causal, cache, (0, 0)
        )

    rows = jnp.arange(batch)

    def body(state):
        t, canvas, cache, finished, forwards, steps_per_token = state
        active = ~finished
        last = jnp.minimum(prompt_lengths - 1 + t, canvas_len - 2)  # [batch]
        tokens = canvas[rows, last][:, None]
        logits, cache = _forward(config, params, tokens, last[:, None], causal, cache)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)
        proposal, _, _ = _propose(static, knobs, logits, step_keys)
        proposal = proposal[:, 0]
        canvas = canvas.at[rows, last + 1].set(jnp.where(active, proposal, canvas[rows, last + 1]))
        stopped = active & _is_stop(proposal, knobs["stop_ids"])
        if stream is not None:
            jax.debug.callback(stream, t, proposal[:, None], last + 1, active, ordered=True)
        finished = finished | stopped | (active & (t + 1 >= g))
        steps_per_token = steps_per_token.at[:, t].set(active.astype(jnp.int32))
        return t + 1, canvas, cache, finished, forwards + active, steps_per_token

    def cond(state):
        t, _, _, finished, *_ = state
        return (t < g) & ~jnp.all(finished)

    zeros = jnp.zeros((batch,), jnp.int32)
    state = (jnp.int32(0), canvas, cache, jnp.zeros((batch,), bool), zeros, jnp.zeros((batch, g), jnp.int32))
    t, canvas, _, _, forwards, steps_per_token = jax.lax.while_loop(cond, body, state)
    return _finish(
        canvas, prompt_lengths, forwards, forwards, steps_per_token, t, static, knobs["stop_ids"]
    )
