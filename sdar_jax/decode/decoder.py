"""Block-diffusion and autoregressive decoding in one jitted loop (spec §3).

`generate` decodes a batch of prompts; `generate_many` decodes a list of
prompts through a fixed number of batch rows ("slots") with continuous
batching. Both run one `lax.while_loop` in which every iteration is one
model forward for the whole batch, against a static KV cache
`[layers, slots, max_len, kv_heads, head_dim]`; nothing is dispatched from
Python per block, step or prompt. The compiled programs hold no host
callbacks (so JAX's persistent compilation cache stores them): host hooks
(streaming, writing results as they finish) run between chunks of the loop,
which hands its state back to the host and resumes it in the same
executable (`generate_many`).

Diffusion mode (SDAR checkpoints), per slot holding a prompt of length P:
  * the prompt's whole blocks (positions < (P // B) * B) are prefilled with
    the block-causal mask (the first prompts in one batch-wide prefill, later
    ones into the slot that frees up, with a one-row prefill);
  * the first decoded block starts at (P // B) * B and keeps the prompt's
    tail; blocks follow each slot's own absolute positions;
  * per-row progress: each slot carries its own block index and step count.
    A forward runs every slot's current block (block-causal mask: the past and
    the block itself), proposes a token per position and lets the strategy
    commit some still-masked ones. A slot whose block has no masked position
    left moves to its next block at the next forward, while the others keep
    denoising theirs, so the batch runs about as many forwards as its
    slowest row needs (not the sum over blocks of the per-block maxima);
  * a finished block's keys and values are written by the slot's next
    forward, which runs [finished block ; new block] (2B tokens) instead of
    spec §3.3's separate pass (same cache contents, one forward less per
    block). With `fused_forward="when_needed"` the batch runs 2B tokens only
    on forwards where some slot starts a block; slots not starting one run
    mask tokens at their next block's positions in that half (cache slots
    nothing sees yet, overwritten by that block's first forward);
  * after each block a slot whose generated part holds a stop id is finished;
    so is one whose canvas (ceil((P + G) / B) blocks) is full. Its result is
    stored, and the next waiting prompt (if any) takes the slot;
  * logits conventions (spec §2.7, `ModelConfig.logits_convention`): with
    "same_position" output j gives position j's proposal; with "shifted"
    output j - 1 does. A block's first position is then predicted by the
    previous block's last output in the fused [previous ; block] pass (for the
    first decoded block too, re-running the last prompt block, so a prompt
    ending on a boundary gets the AR prediction of its last token); that
    proposal is kept for the block's later steps, whose B-token forwards
    cannot see it;
  * sampling keys: step s of a sequence's k-th decoded block draws with
    fold_in(fold_in(sequence key, k), s) over the block's [B, vocab] logits,
    so a sequence does not depend on its batch mates or its slot.
AR mode (plain Qwen3 checkpoints): next-token prediction with the causal mask
and the same cache, one token per slot per forward (key fold_in(key, t)),
with the same slots and queue.

Static (compile-time) choices are the mode, block length, greedy or sampled,
top-k, whether top-p is on, max_new_tokens, the number of stop ids, the
fused-forward layout, the slot count, and whether the strategy is a staged
one (SAID: its stage count too). The per-step strategy (a traced index into
a `lax.switch`), the step count, thresholds, temperature, top-p value and
stop ids are traced, so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdar_jax import parallel
from sdar_jax.config import ModelConfig
from sdar_jax.decode import said, sampling, strategies
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec

MODES = ("diffusion", "ar")
FUSED_FORWARDS = ("when_needed", "always")
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
      fused_forward: when the batch runs the 2B-token [previous ; block]
        forward that writes finished blocks' keys and values: "when_needed"
        (only on forwards where some row starts a block, B tokens otherwise)
        or "always" (every forward; rows not starting a block run masks in the
        first half). Outputs are the same; see docs/benchmarks.md for the cost.
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
    fused_forward: str = "when_needed"

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
        if self.fused_forward not in FUSED_FORWARDS:
            raise ValueError(f"DecodeConfig.fused_forward {self.fused_forward!r} is unknown; "
                             f"expected one of {FUSED_FORWARDS}")
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
        return said.stage_steps(self.block_length, self.said_stages, self.steps, rec)


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
      prefill passes; the fused pass that writes a finished block counts as
      the new block's first forward).
    num_committed: [batch] int32, positions the row committed.
    tokens_per_forward: [batch] float32, num_committed / num_forwards.
    steps_per_block: [batch, max_blocks] int32, forwards spent on each of the
      row's blocks (0 past its last block); in AR mode one entry per token.
    batch_forwards: int32 scalar, forwards the batch ran (with per-row
      progress about max(num_forwards); with continuous batching, over the
      whole prompt list).
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
    fused_forward: str
    num_slots: int


def _split(dc: DecodeConfig, num_slots: int) -> tuple[_Static, dict[str, jnp.ndarray]]:
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
        fused_forward=dc.fused_forward,
        num_slots=num_slots,
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


class Hooks(NamedTuple):
    """Host functions the decoder calls between its jitted chunks (see
    `generate_many`). They are not part of any compiled program: any hooks, or
    none, run the same executables, which JAX's persistent cache can store.

    stream: `stream(block_index, block_tokens, block_start, done)` after every
      forward that completed a block in some slot, with [slots] block indices,
      [slots, B] tokens of each slot's block, [slots] start positions and
      [slots] bool the slots whose block this forward completed (only those
      entries are meaningful; AR: the token index, [slots, 1] tokens, their
      positions, the slots that produced one).
    on_finish: `on_finish(items, finished, tokens, lengths, num_forwards,
      num_committed)` after every forward that finished sequences: [slots]
      prompt indices, [slots] bool the slots that finished (only those entries
      are meaningful), [slots, max_new_tokens] tokens (cut as in DecodeResult),
      [slots] lengths and counters. All arguments are NumPy arrays.
    """

    stream: Callable[..., None] | None = None
    on_finish: Callable[..., None] | None = None


def _check_inputs(config: ModelConfig, prompt_tokens, prompt_lengths, decode_config: DecodeConfig):
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
    return prompt_tokens, prompt_lengths


def generate(
    params: dict,
    config: ModelConfig,
    prompt_tokens: jnp.ndarray,
    prompt_lengths: jnp.ndarray,
    rng: jax.Array,
    decode_config: DecodeConfig,
    stream: Callable[..., None] | None = None,
) -> DecodeResult:
    """Decodes a batch of (right-padded) prompts, each row at its own pace.

    Args:
      params: the model's param pytree.
      config: the model config.
      prompt_tokens: [batch, max_prompt] int32, row r valid in [0, P_r).
      prompt_lengths: [batch] int32 P_r, 1 <= P_r <= max_prompt.
      rng: one PRNG key (split per row) or [batch] keys (one per sequence, so a
        sampled sequence does not depend on its batch mates). Unused when
        greedy.
      decode_config: the decoding knobs.
      stream: optional host function, see `Hooks.stream`.

    Returns:
      DecodeResult.
    """
    return generate_many(params, config, prompt_tokens, prompt_lengths, rng, decode_config,
                         num_slots=None, hooks=Hooks(stream=stream))


def generate_many(
    params: dict,
    config: ModelConfig,
    prompt_tokens: jnp.ndarray,
    prompt_lengths: jnp.ndarray,
    rng: jax.Array,
    decode_config: DecodeConfig,
    num_slots: int | None = None,
    hooks: Hooks = Hooks(),
) -> DecodeResult:
    """Decodes a list of prompts with continuous batching.

    The batch has `num_slots` rows. The first prompts fill them; whenever a
    row's sequence finishes (stop id or budget), the next waiting prompt is
    prefilled into that row and decoded while the others go on. Results are
    per prompt, in input order, each equal to decoding that prompt alone.

    Without hooks the whole list decodes in one call of the jitted loop. With
    hooks the loop returns its state to the host after each forward that
    finished a sequence (`on_finish`) or completed a block (`stream`); the host
    calls the hooks and resumes the same executable with that state (donated,
    so the cache is not copied). Tokens do not depend on where the loop paused.

    Args:
      params, config: the model.
      prompt_tokens: [num_prompts, max_prompt] int32, right-padded.
      prompt_lengths: [num_prompts] int32 P, 1 <= P <= max_prompt.
      rng: one PRNG key (split per prompt) or [num_prompts] keys.
      decode_config: the decoding knobs.
      num_slots: batch rows (default and at most: num_prompts). Static.
      hooks: host functions called between chunks (see `Hooks`).

    Returns:
      DecodeResult over the prompts ([num_prompts, ...]); batch_forwards
      counts the forwards of the whole run.
    """
    prompt_tokens, prompt_lengths = _check_inputs(config, prompt_tokens, prompt_lengths,
                                                  decode_config)
    num_items = prompt_tokens.shape[0]
    num_slots = num_items if num_slots is None else min(num_slots, num_items)
    if not isinstance(num_slots, (int, np.integer)) or num_slots < 1:
        raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}")
    static, knobs = _split(decode_config, int(num_slots))
    keys = _row_keys(rng, num_items)
    inputs = (params, prompt_tokens, prompt_lengths, keys, knobs)
    if hooks.stream is not None:
        pause = _PAUSE_ON_BLOCK
    elif hooks.on_finish is not None:
        pause = _PAUSE_ON_FINISH
    else:
        pause = _RUN_TO_END
    state = _start(*inputs, config=config, static=static)
    # Committed like the states `_resume` returns, so the first resume is not a
    # compilation of its own (uncommitted inputs lower to another program).
    state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, state))
    while True:
        state, report = _resume(*inputs, state, jnp.int32(pause), config=config, static=static)
        if pause == _RUN_TO_END:
            break
        report = jax.device_get(report)
        _call_hooks(hooks, report)
        if report.all_done:
            break
    return _results(state.outputs, prompt_lengths, state.batch_forwards, knobs["stop_ids"],
                    static=static)


# What makes the jitted loop hand its state back to the host (a traced value:
# every mode runs the same executable).
_RUN_TO_END, _PAUSE_ON_FINISH, _PAUSE_ON_BLOCK = 0, 1, 2


def _program(params, prompt_tokens, prompt_lengths, keys, knobs, config, static) -> _Program:
    build = _ar_program if static.mode == "ar" else _diffusion_program
    return build(params, prompt_tokens, prompt_lengths, keys, knobs, config, static)


@functools.partial(jax.jit, static_argnames=("config", "static"))
def _start(params, prompt_tokens, prompt_lengths, keys, knobs, *, config, static):
    """The loop state with the first prompts in the slots (prefilled by `_resume`)."""
    return _pin(_program(params, prompt_tokens, prompt_lengths, keys, knobs, config, static).init())


@functools.partial(jax.jit, static_argnames=("config", "static"), donate_argnames=("state",))
def _resume(params, prompt_tokens, prompt_lengths, keys, knobs, state, pause, *, config, static):
    """Runs the loop from `state` until the queue is done or `pause` asks to stop;
    returns (state, _Report of the last forward)."""
    program = _program(params, prompt_tokens, prompt_lengths, keys, knobs, config, static)
    state, report = _run_queue(state, program, static, knobs["stop_ids"], prompt_tokens.shape[0],
                               pause)
    # Replicated: every process of a multi-host mesh reads the whole (small) report.
    report = jax.tree.map(lambda x: parallel.constrain(x, (None,) * x.ndim, where="report"), report)
    return _pin(state), report


def _pin(state):
    """Pins a loop state's per-slot leaves ([slots, ...]) to the rules' batch sharding and
    its cache to the cache's, so that `_start` and `_resume` return states laid out
    alike under a mesh: resuming never recompiles for a new input layout."""
    per_slot = jax.tree.map(
        lambda x: x if x.ndim == 0 else parallel.constrain(
            x, ("batch",) + (None,) * (x.ndim - 1), where="decoder state"),
        state.replace(cache=None, outputs=None))
    return per_slot.replace(cache=parallel.constrain_cache(state.cache), outputs=state.outputs)


@functools.partial(jax.jit, static_argnames=("static",))
def _results(outputs, prompt_lengths, batch_forwards, stop_ids, *, static) -> DecodeResult:
    """The DecodeResult of the finished queue."""
    return _finish(outputs.canvas, prompt_lengths, outputs.forwards, outputs.committed,
                   outputs.steps_per_block, batch_forwards, static, stop_ids)


def _call_hooks(hooks: Hooks, report: _Report) -> None:
    """Hands the host copy of a chunk's last forward to the hooks."""
    block, rows = report.block, report.finished
    if hooks.stream is not None and block.done.any():
        hooks.stream(block.index, block.tokens, block.start, block.done)
    if hooks.on_finish is not None and rows.finished.any():
        hooks.on_finish(rows.item, rows.finished, rows.tokens, rows.lengths, rows.forwards,
                        rows.committed)


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


def _cut(canvas, prompt_lengths, max_new_tokens, stop_ids):
    """Each row's generated part up to its first stop id: ([n, G] tokens, PAD_ID after; [n] lengths)."""
    offsets = jnp.arange(max_new_tokens, dtype=jnp.int32)
    generated = jnp.take_along_axis(canvas, prompt_lengths[:, None] + offsets, axis=1)
    stops = _is_stop(generated, stop_ids)
    lengths = jnp.where(stops.any(-1), jnp.argmax(stops, axis=-1) + 1, max_new_tokens)
    lengths = lengths.astype(jnp.int32)
    return jnp.where(offsets[None] < lengths[:, None], generated, PAD_ID), lengths


def _finish(
    canvas, prompt_lengths, forwards, committed, steps_per_block, batch_forwards, static, stop_ids
):
    """Cuts each row's generated part at its first stop id and packs the result."""
    tokens, lengths = _cut(canvas, prompt_lengths, static.max_new_tokens, stop_ids)
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
        commit, stage_done = said.said_select(
            confidence, masked, stage_done,
            stage_of=said.stage_partition(static.block_length, static.said_stages),
            steps_per_stage=knobs["steps_per_stage"],
            threshold=knobs["said_threshold"] if static.said_dynamic else None,
            chlg_threshold=knobs["chlg_threshold"] if static.staged == "said_chlg" else None,
            chlg_extra_steps=knobs["chlg_extra_steps"],
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


def _said_state(batch: int, static: _Static):
    """SAID's per-row stage state at the start of a block (opaque to the loop)."""
    return said.init_stage_state(batch, static.said_stages)


def _where_rows(rows: jnp.ndarray, new, old):
    """Per-row select over pytrees whose leaves have a leading [batch] axis."""
    return jax.tree.map(
        lambda n, o: jnp.where(rows.reshape(rows.shape + (1,) * (o.ndim - 1)), n, o), new, old
    )


def _run_if(pred: jnp.ndarray, fn, operand):
    """fn(operand) if the traced scalar `pred` holds, else operand (fn keeps its
    structure, shapes and dtypes), updating operand's buffers in place.

    `lax.cond` would do the same, but XLA copies every buffer that a cond branch
    updates in place (the whole KV cache, each forward); a while loop's carry is
    updated in place, so this runs fn as a loop of zero or one trip.
    """
    def once(carry):
        return jnp.bool_(False), fn(carry[1])

    return jax.lax.while_loop(lambda carry: carry[0], once, (pred, operand))[1]


def _cond(pred: jnp.ndarray, true_fn, false_fn, operand):
    """`lax.cond(pred, true_fn, false_fn, operand)` by two `_run_if`s (in place)."""
    return _run_if(~pred, false_fn, _run_if(pred, true_fn, operand))


def _fold_keys(keys: jax.Array, *indices: jnp.ndarray) -> jax.Array:
    """[batch] keys folded with per-row indices, in order."""
    for index in indices:
        keys = jax.vmap(jax.random.fold_in)(keys, index)
    return keys


def _row_cache(cache: transformer.KVCache, slot: jnp.ndarray) -> transformer.KVCache:
    return jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=1), cache)


def _put_row_cache(cache, row, slot):
    return jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, axis=1), cache, row)


@flax.struct.dataclass
class _Outputs:
    """Finished sequences, indexed by prompt (queue item).

    canvas: [items, canvas_len]; forwards, committed: [items];
    steps_per_block: [items, max_blocks].
    """

    canvas: jnp.ndarray
    forwards: jnp.ndarray
    committed: jnp.ndarray
    steps_per_block: jnp.ndarray

    def store(self, rows: jnp.ndarray, item: jnp.ndarray, canvas, forwards, committed, steps):
        """Writes the slots in `rows` ([slots] bool) at their items (others are dropped)."""
        where = jnp.where(rows, item, self.canvas.shape[0])  # out of range: the write is dropped
        return _Outputs(
            canvas=self.canvas.at[where].set(canvas, mode="drop"),
            forwards=self.forwards.at[where].set(forwards, mode="drop"),
            committed=self.committed.at[where].set(committed, mode="drop"),
            steps_per_block=self.steps_per_block.at[where].set(steps, mode="drop"),
        )


class _Program(NamedTuple):
    """One mode's decoding loop as functions of its state (closures over the inputs).

    init: () -> state, the first prompts in the slots (not yet prefilled).
    prefill: (canvas, cache) -> cache with the canvas rows' prompt keys and values.
    forward: state -> (state, _Block), one forward for every slot.
    admit: state -> state, the next waiting prompt into the first free slot.
    counters: state -> (forwards, committed, steps_per_block), per slot.
    """

    init: Callable
    prefill: Callable
    forward: Callable
    admit: Callable
    counters: Callable


@flax.struct.dataclass
class _Block:
    """What one forward did to the slots' blocks (AR: to their next token).

    done: [slots] bool, slots whose block it completed; index: [slots] those
    blocks' indices; start: [slots] their first positions; tokens: [slots, B].
    """

    done: jnp.ndarray
    index: jnp.ndarray
    start: jnp.ndarray
    tokens: jnp.ndarray


@flax.struct.dataclass
class _Finished:
    """The sequences one forward finished, before their slots are refilled.

    finished: [slots] bool; item: [slots] their prompt indices; tokens:
    [slots, G] cut as in DecodeResult; lengths, forwards, committed: [slots].
    """

    finished: jnp.ndarray
    item: jnp.ndarray
    tokens: jnp.ndarray
    lengths: jnp.ndarray
    forwards: jnp.ndarray
    committed: jnp.ndarray


@flax.struct.dataclass
class _Report:
    """A chunk's last forward, for the host's hooks; all_done: the queue is finished."""

    block: _Block
    finished: _Finished
    all_done: jnp.ndarray


def _empty_report(slots: int, block_length: int, max_new_tokens: int) -> _Report:
    flags, ints = jnp.zeros((slots,), bool), jnp.zeros((slots,), jnp.int32)
    return _Report(
        block=_Block(done=flags, index=ints, start=ints,
                     tokens=jnp.zeros((slots, block_length), jnp.int32)),
        finished=_Finished(finished=flags, item=ints,
                           tokens=jnp.zeros((slots, max_new_tokens), jnp.int32),
                           lengths=ints, forwards=ints, committed=ints),
        all_done=jnp.bool_(False),
    )


def _run_queue(state, program: _Program, static: _Static, stop_ids, num_items: int, pause):
    """The loop shared by both modes: one forward for every slot per iteration
    until all slots are done or `pause` (traced) asks to return after a forward
    that finished a sequence (_PAUSE_ON_FINISH) or completed a block
    (_PAUSE_ON_BLOCK). After a forward that finished sequences their results
    are stored and waiting prompts take their slots.

    Returns (state, _Report of the last forward).
    """
    empty = _empty_report(static.num_slots, static.block_length, static.max_new_tokens)

    def refill(st, finished):
        forwards, committed, steps = program.counters(st)
        tokens, lengths = _cut(st.canvas, st.length, static.max_new_tokens, stop_ids)
        rows = _Finished(finished=finished, item=st.item, tokens=tokens, lengths=lengths,
                         forwards=forwards, committed=committed)
        st = st.replace(
            outputs=st.outputs.store(finished, st.item, st.canvas, forwards, committed, steps),
            item=jnp.where(finished, num_items, st.item),
        )
        if num_items > static.num_slots:  # prompts may wait: prefill them into free slots
            st = jax.lax.while_loop(
                lambda st: (st.next_item < num_items) & jnp.any(st.item >= num_items),
                program.admit, st,
            )
        return st, rows

    def keep(st, finished):
        return st, empty.finished

    def body(carry):
        st, _ = carry
        was_done = st.done
        st, block = program.forward(st)
        finished = st.done & ~was_done
        st, rows = _run_if(jnp.any(finished), lambda carry: refill(carry[0], finished),
                           (st, empty.finished))
        return st, _Report(block=block, finished=rows, all_done=jnp.all(st.done))

    def go_on(carry):
        st, report = carry
        paused = (((pause >= _PAUSE_ON_FINISH) & jnp.any(report.finished.finished))
                  | ((pause >= _PAUSE_ON_BLOCK) & jnp.any(report.block.done)))
        return ~report.all_done & ~paused

    def prefill_first(st):
        return st.replace(cache=program.prefill(st.canvas, st.cache), prefilled=jnp.bool_(True))

    state = _run_if(~state.prefilled, prefill_first, state)
    return jax.lax.while_loop(go_on, body, (state, empty))


def _fresh_canvas(prompt_tokens, prompt_lengths, items, canvas_len, fill):
    """[n, canvas_len] canvases of the prompts `items` ([n]) then `fill`, and [n] lengths."""
    length = prompt_lengths[items]
    padded = jnp.pad(prompt_tokens[items], ((0, 0), (0, canvas_len - prompt_tokens.shape[1])))
    pos = jnp.arange(canvas_len, dtype=jnp.int32)
    return jnp.where(pos[None] < length[:, None], padded, fill), length


def _prefill(config, params, canvas, cache, length, mask):
    """Writes the keys and values of every row's first `length` canvas positions."""
    if not length:
        return cache
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (canvas.shape[0], length))
    _, cache = _forward(config, params, canvas[:, :length], positions, mask, cache, (0, 0))
    return cache


def _take_free_slot(st, fresh, prefill):
    """The next waiting prompt into the first free slot: its canvas, length and
    prefilled cache row. Returns (one-hot [slots] of the slot, item, canvas
    [1, canvas_len], length [1], cache)."""
    slot = jnp.argmax(st.item >= st.outputs.forwards.shape[0])
    item = st.next_item
    canvas, length = fresh(item[None])
    cache = _put_row_cache(st.cache, prefill(canvas, _row_cache(st.cache, slot)), slot)
    return jnp.arange(st.item.shape[0]) == slot, item, canvas, length, cache


def _empty_outputs(num_items: int, canvas_len: int, max_blocks: int) -> _Outputs:
    return _Outputs(
        canvas=jnp.zeros((num_items, canvas_len), jnp.int32),
        forwards=jnp.zeros((num_items,), jnp.int32),
        committed=jnp.zeros((num_items,), jnp.int32),
        steps_per_block=jnp.zeros((num_items, max_blocks), jnp.int32),
    )


@flax.struct.dataclass
class _DiffusionState:
    """The diffusion loop's state: one slot per batch row, each at its own block and step.

    canvas: [slots, canvas_len] the slot's prompt and every committed token
      (masks elsewhere).
    cache: the KV cache, [layers, slots, canvas_len, kv_heads, head_dim].
    item: [slots] index of the prompt in the slot (num_items: none).
    length: [slots] its prompt length P.
    block: [slots] index k of the slot's current decoded block.
    step: [slots] forwards spent on that block so far.
    masked: [slots, B] the block's still-masked positions.
    said: SAID's per-row stage state (staged strategies).
    first: position 0's proposal (token, confidence, entropy), each [slots],
      drawn at the block's first step (kept under the shifted convention).
    done: [slots] the slot's sequence is finished (stop id or full canvas).
    forwards, committed: [slots] per-sequence counters.
    steps_per_block: [slots, max_blocks].
    next_item: scalar, the first prompt not yet given a slot.
    prefilled: scalar bool, the first prompts' cache rows are written (by the
      loop's first call, so that prefill is compiled into the loop's program).
    batch_forwards: scalar, forwards the batch ran.
    outputs: the finished sequences.
    """

    canvas: jnp.ndarray
    cache: transformer.KVCache
    item: jnp.ndarray
    length: jnp.ndarray
    block: jnp.ndarray
    step: jnp.ndarray
    masked: jnp.ndarray
    said: said.StageState
    first: tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]
    done: jnp.ndarray
    forwards: jnp.ndarray
    committed: jnp.ndarray
    steps_per_block: jnp.ndarray
    next_item: jnp.ndarray
    prefilled: jnp.ndarray
    batch_forwards: jnp.ndarray
    outputs: _Outputs


def _diffusion_program(params, prompt_tokens, prompt_lengths, keys, knobs, config, static):
    """Block diffusion over a queue of prompts with `static.num_slots` slots (see module doc)."""
    b, g, slots = static.block_length, static.max_new_tokens, static.num_slots
    shifted = config.logits_convention == "shifted"
    num_items, max_prompt = prompt_tokens.shape
    canvas_len = -(-(max_prompt + g) // b) * b
    max_blocks = min(-(-g // b) + 1, canvas_len // b)
    mask_id = config.mask_token_id
    block_mask = MaskSpec("block_causal", b, config.causal_in_block)
    offsets = jnp.arange(b, dtype=jnp.int32)
    prefill_len = (max_prompt // b) * b
    rows = jnp.arange(slots)

    def fresh_canvas(items):
        return _fresh_canvas(prompt_tokens, prompt_lengths, items, canvas_len, mask_id)

    def prefill(canvas, cache):
        # Positions past a row's own whole blocks hold junk here; each block's
        # first forward overwrites its slots before attending, and the
        # block-causal mask hides later slots.
        return _prefill(config, params, canvas, cache, prefill_len, block_mask)

    def first_start(length):
        return (length // b) * b

    def num_blocks(length):
        return (-(-(length + g) // b) * b - first_start(length)) // b

    def first_masked(length):
        return (first_start(length)[:, None] + offsets[None]) >= length[:, None]

    # ---- one forward for every slot -----------------------------------------------------------
    def forward(st, positions, starting):
        """Logits [slots, B, vocab] of the slots' blocks, writing finished blocks' K/V."""
        tokens = jnp.take_along_axis(st.canvas, positions, axis=1)
        # Shifted: a block's position 0 is predicted only by the pass that
        # writes the previous block (for the first block, its prompt block).
        has_previous = positions[:, 0] >= b
        writes_previous = starting & has_previous & ((st.block > 0) | shifted)
        # Slots not writing a previous block run mask tokens at their next
        # block's positions in the first half: slots no query of theirs sees
        # yet, overwritten by that block's first forward (dropped past the end).
        first_positions = jnp.where(writes_previous[:, None], positions - b, positions + b)
        first_tokens = jnp.where(
            writes_previous[:, None],
            jnp.take_along_axis(st.canvas, jnp.minimum(first_positions, canvas_len - 1), axis=1),
            mask_id,
        )

        def fused(carry):  # carry: (logits, cache) -> the same, this forward's
            both = jnp.concatenate([first_positions, positions], axis=1)
            head = (b - 1, 2 * b - 1) if shifted else (b, 2 * b)
            return _forward(config, params, jnp.concatenate([first_tokens, tokens], axis=1), both,
                            block_mask, carry[1], head)

        def plain(carry):
            cache = carry[1]
            if not shifted:
                return _forward(config, params, tokens, positions, block_mask, cache)
            logits, cache = _forward(config, params, tokens, positions, block_mask, cache, (0, b - 1))
            # Position 0 keeps its first-step proposal (st.first); its logits row is unread.
            unread = jnp.zeros((slots, 1, logits.shape[-1]), logits.dtype)
            return jnp.concatenate([unread, logits], axis=1), cache

        if static.fused_forward == "always":
            return fused((None, st.cache))
        no_logits = jnp.zeros((slots, b, config.vocab_size), jnp.float32)
        return _cond(jnp.any(writes_previous), fused, plain, (no_logits, st.cache))

    def denoise(st):
        """One forward for every slot: proposals, commits, finished blocks and sequences."""
        active = ~st.done
        start = jnp.minimum(first_start(st.length) + st.block * b, canvas_len - b)
        positions = start[:, None] + offsets[None]
        starting = active & (st.step == 0)
        logits, cache = forward(st, positions, starting)
        item_keys = keys[jnp.minimum(st.item, num_items - 1)]
        step_keys = _fold_keys(item_keys, st.block, st.step)
        proposals, confidence, entropy = _propose(static, knobs, logits, step_keys)
        first = _where_rows(starting, (proposals[:, 0], confidence[:, 0], entropy[:, 0]), st.first)
        if shifted:
            proposals, confidence, entropy = (
                x.at[:, 0].set(f) for x, f in zip((proposals, confidence, entropy), first)
            )
        said_state = said.reset_rows(st.said, starting)
        masked = st.masked & active[:, None]
        commit, said_state = _select(
            static, knobs, confidence, entropy, masked, st.step, said_state
        )
        block = jnp.where(commit, proposals, jnp.take_along_axis(st.canvas, positions, axis=1))
        canvas = st.canvas.at[rows[:, None], positions].set(block)
        masked = masked & ~commit
        step = st.step + active

        block_done = active & ~masked.any(-1)
        generated = (positions >= st.length[:, None]) & (positions < (st.length + g)[:, None])
        stopped = jnp.any(_is_stop(block, knobs["stop_ids"]) & generated, axis=-1)
        finishing = block_done & (stopped | (st.block + 1 >= num_blocks(st.length)))
        advance = block_done & ~finishing
        state = st.replace(
            canvas=canvas,
            cache=cache,
            block=st.block + advance,
            step=jnp.where(advance, 0, step),
            masked=masked | advance[:, None],  # blocks after the first are all masks
            said=said_state,
            first=first,
            done=st.done | finishing,
            forwards=st.forwards + active,
            committed=st.committed + commit.sum(-1),
            steps_per_block=st.steps_per_block.at[rows, st.block].set(
                jnp.where(block_done, step, st.steps_per_block[rows, st.block])),
            batch_forwards=st.batch_forwards + 1,
        )
        return state, _Block(done=block_done, index=st.block, start=start, tokens=block)

    # ---- a waiting prompt into a free slot --------------------------------------------------
    def admit(st):
        one, item, canvas, length, cache = _take_free_slot(st, fresh_canvas, prefill)
        return st.replace(
            canvas=jnp.where(one[:, None], canvas, st.canvas),
            cache=cache,
            item=jnp.where(one, item, st.item),
            length=jnp.where(one, length, st.length),
            block=jnp.where(one, 0, st.block),
            step=jnp.where(one, 0, st.step),
            masked=jnp.where(one[:, None], first_masked(length), st.masked),
            done=st.done & ~one,
            forwards=jnp.where(one, 0, st.forwards),
            committed=jnp.where(one, 0, st.committed),
            steps_per_block=jnp.where(one[:, None], 0, st.steps_per_block),
            next_item=item + 1,
        )

    # ---- the first prompts fill the slots (one prefill, at the loop's first call) ------------
    def init():
        canvas, length = fresh_canvas(rows)
        cache = parallel.constrain_cache(transformer.init_cache(config, slots, canvas_len))
        zeros = jnp.zeros((slots,), jnp.int32)
        return _DiffusionState(
            canvas=canvas, cache=cache, item=rows.astype(jnp.int32), length=length,
            block=zeros, step=zeros, masked=first_masked(length), said=_said_state(slots, static),
            first=(zeros, zeros.astype(jnp.float32), zeros.astype(jnp.float32)),
            done=jnp.zeros((slots,), bool), forwards=zeros, committed=zeros,
            steps_per_block=jnp.zeros((slots, max_blocks), jnp.int32),
            next_item=jnp.int32(slots), prefilled=jnp.bool_(False), batch_forwards=jnp.int32(0),
            outputs=_empty_outputs(num_items, canvas_len, max_blocks),
        )

    def counters(st):
        return st.forwards, st.committed, st.steps_per_block

    return _Program(init=init, prefill=prefill, forward=denoise, admit=admit, counters=counters)


@flax.struct.dataclass
class _ARState:
    """The AR loop's state: one slot per batch row, each at its own token.

    canvas: [slots, canvas_len] prompt then generated tokens; cache: the KV
    cache; item, length: the slot's prompt and its P; t: [slots] tokens
    generated so far; done, forwards: [slots]; next_item, prefilled,
    batch_forwards: scalars (see _DiffusionState); outputs: the finished
    sequences.
    """

    canvas: jnp.ndarray
    cache: transformer.KVCache
    item: jnp.ndarray
    length: jnp.ndarray
    t: jnp.ndarray
    done: jnp.ndarray
    forwards: jnp.ndarray
    next_item: jnp.ndarray
    prefilled: jnp.ndarray
    batch_forwards: jnp.ndarray
    outputs: _Outputs


def _ar_program(params, prompt_tokens, prompt_lengths, keys, knobs, config, static):
    """Next-token decoding over a queue of prompts with `static.num_slots` slots."""
    g, slots = static.max_new_tokens, static.num_slots
    num_items, max_prompt = prompt_tokens.shape
    canvas_len = max_prompt + g
    causal = MaskSpec("causal")
    prefill_len = max_prompt - 1
    rows = jnp.arange(slots)

    def fresh_canvas(items):
        return _fresh_canvas(prompt_tokens, prompt_lengths, items, canvas_len, 0)

    def prefill(canvas, cache):
        # Positions at or past a row's last prompt token are rewritten before use.
        return _prefill(config, params, canvas, cache, prefill_len, causal)

    def step(st):
        """One token for every slot."""
        active = ~st.done
        last = jnp.minimum(st.length - 1 + st.t, canvas_len - 2)
        logits, cache = _forward(config, params, st.canvas[rows, last][:, None], last[:, None],
                                 causal, st.cache)
        step_keys = _fold_keys(keys[jnp.minimum(st.item, num_items - 1)], st.t)
        proposal = _propose(static, knobs, logits, step_keys)[0][:, 0]
        canvas = st.canvas.at[rows, last + 1].set(
            jnp.where(active, proposal, st.canvas[rows, last + 1]))
        finishing = active & (_is_stop(proposal, knobs["stop_ids"]) | (st.t + 1 >= g))
        state = st.replace(
            canvas=canvas, cache=cache, t=st.t + active, done=st.done | finishing,
            forwards=st.forwards + active, batch_forwards=st.batch_forwards + 1,
        )
        return state, _Block(done=active, index=st.t, start=last + 1, tokens=proposal[:, None])

    def admit(st):
        one, item, canvas, length, cache = _take_free_slot(st, fresh_canvas, prefill)
        return st.replace(
            canvas=jnp.where(one[:, None], canvas, st.canvas), cache=cache,
            item=jnp.where(one, item, st.item), length=jnp.where(one, length, st.length),
            t=jnp.where(one, 0, st.t), done=st.done & ~one, forwards=jnp.where(one, 0, st.forwards),
            next_item=item + 1,
        )

    def init():
        canvas, length = fresh_canvas(rows)
        cache = parallel.constrain_cache(transformer.init_cache(config, slots, canvas_len))
        zeros = jnp.zeros((slots,), jnp.int32)
        return _ARState(
            canvas=canvas, cache=cache, item=rows.astype(jnp.int32),
            length=length, t=zeros, done=jnp.zeros((slots,), bool), forwards=zeros,
            next_item=jnp.int32(slots), prefilled=jnp.bool_(False), batch_forwards=jnp.int32(0),
            outputs=_empty_outputs(num_items, canvas_len, g),
        )

    def counters(st):
        steps_per_token = (jnp.arange(g)[None] < st.forwards[:, None]).astype(jnp.int32)
        return st.forwards, st.forwards, steps_per_token

    return _Program(init=init, prefill=prefill, forward=step, admit=admit, counters=counters)
