"""A plain, obviously-correct block-diffusion decoder (spec §3 and §4), for tests.

One sequence at a time, no KV cache: every denoising step recomputes the
model's full forward over the whole canvas with the block-causal mask (blocks
after the current one hold masks and are invisible to it). Strategies are
written here independently of `sdar_jax.decode` with plain loops and sorts;
only the SAID step-budget split (`said.stage_steps`, tested on its own against
the public SAID code's values) is shared.

Sampling (temperature > 0) is the Gumbel-max draw argmax(filtered logits /
T + Gumbel noise), with the noise of the decoder's documented per-step key
`fold_in(fold_in(row key, block index), step)` over the block's [B, vocab]
logits; the temperature, top-k and top-p filters are written here in NumPy.

With `block_attention="causal"` the forward uses the plain causal mask.

Logits conventions (spec §2.7): "same_position" reads position j's
distribution from output j; "shifted" from output j - 1, which for a
block's first position is the previous block's last output (invariant
within the block, so its proposal is drawn once, at the block's first step).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sdar_jax.config import ModelConfig
from sdar_jax.decode import said
from sdar_jax.decode.decoder import DecodeConfig
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec


@dataclasses.dataclass
class ReferenceResult:
    tokens: list[int]  # generated tokens up to and including the first stop id
    num_forwards: int  # denoising forwards
    num_committed: int
    steps_per_block: list[int]


@functools.lru_cache(maxsize=None)
def _full_forward(config: ModelConfig, block_length: int):
    @jax.jit
    def forward(params, tokens):
        positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)[None]
        # Causal attention inside blocks makes the block-causal mask the plain causal one.
        mask = MaskSpec("causal") if config.block_attention == "causal" else MaskSpec(
            "block_causal", block_length)
        out = transformer.apply(config, params, tokens[None], positions, mask=mask)
        return out.logits[0]

    return forward


def _schedule(length: int, steps: int) -> list[int]:
    return [length // steps + (1 if i < length % steps else 0) for i in range(steps)]


def _most_confident(candidates: list[int], confidence: np.ndarray, n: int) -> list[int]:
    return sorted(candidates, key=lambda i: (-confidence[i], i))[:n]


def _stage_of(p: int, num_stages: int) -> int:
    """Stage by the number of trailing zero bits of p (0 counts as infinitely many)."""
    if p == 0:
        return 0
    trailing = (p & -p).bit_length() - 1
    return 0 if trailing >= num_stages - 1 else num_stages - 1 - trailing


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _filter(scaled: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Top-k then nucleus filtering of [B, vocab] float32 scaled logits (-inf = dropped)."""
    out = scaled.copy()
    if 0 < top_k < out.shape[-1]:
        kth = np.sort(out, axis=-1)[:, -top_k][:, None]
        out[out < kth] = -np.inf
    if top_p < 1.0:
        for row in out:
            probs = _softmax(row.astype(np.float32))
            order = np.argsort(-probs, kind="stable")
            mass_above = np.cumsum(probs[order]) - probs[order]
            row[order[mass_above >= top_p]] = -np.inf
    return out


class _Block:
    """One block being denoised: tokens, which positions are masked, and the model."""

    def __init__(self, forward, params, canvas, start, masked, dc, shifted, key):
        self.forward, self.params, self.canvas = forward, params, canvas
        self.start, self.length, self.dc, self.shifted = start, dc.block_length, dc, shifted
        self.key = key  # this block's PRNG key (sampling), or None
        self.masked = masked  # block-relative positions still masked
        self.forwards = 0
        self.committed = 0
        self.first = None  # position 0's proposal under the shifted convention

    def score(self):
        """Proposals, their confidences and the entropies, each [B] over the block."""
        out = np.asarray(self.forward(self.params, jnp.asarray(self.canvas)), np.float32)
        b, dc = self.length, self.dc
        rows = np.arange(self.start, self.start + b) - (1 if self.shifted else 0)
        logits = out[np.maximum(rows, 0)]
        temperature = dc.temperature if dc.temperature > 0 else 1.0
        scaled = logits / np.float32(temperature)
        probs = _softmax(scaled.astype(np.float64))
        if dc.temperature == 0:
            tokens = logits.argmax(-1)
        else:
            step_key = jax.random.fold_in(self.key, self.forwards)
            noise = np.asarray(jax.random.gumbel(step_key, logits.shape, jnp.float32))
            tokens = (_filter(scaled, dc.top_k, dc.top_p) + noise).argmax(-1)
        confidence = probs[np.arange(b), tokens]
        entropy = -np.sum(np.where(probs > 0, probs * np.log(np.maximum(probs, 1e-300)), 0.0), -1)
        if self.shifted:
            if self.first is None:
                self.first = (tokens[0], confidence[0], entropy[0])
            tokens[0], confidence[0], entropy[0] = self.first
        self.forwards += 1
        return tokens, confidence, entropy

    def commit(self, positions, tokens):
        for i in positions:
            assert i in self.masked, "reference strategy committed an unmasked position"
            self.canvas[self.start + i] = int(tokens[i])
            self.masked.remove(i)
            self.committed += 1


def _denoise_plain(block: _Block, dc: DecodeConfig) -> None:
    b = dc.block_length
    schedule = _schedule(b, dc.steps)
    step = 0
    while block.masked:
        tokens, confidence, entropy = block.score()
        n = schedule[step] if step < len(schedule) else b
        masked = sorted(block.masked)
        if dc.strategy == "sequential":
            chosen = masked[:n]
        elif dc.strategy == "low_confidence_static":
            chosen = _most_confident(masked, confidence, n)
        elif dc.strategy == "low_confidence_dynamic":
            above = [i for i in masked if confidence[i] > dc.threshold]
            chosen = above if len(above) >= n else _most_confident(masked, confidence, n)
        elif dc.strategy == "entropy_bounded":
            chosen, total = [], 0.0
            for i in sorted(masked, key=lambda i: (entropy[i], i)):
                if chosen and total + entropy[i] > dc.eb_bound:
                    break
                chosen.append(i)
                total += entropy[i]
        else:
            raise ValueError(dc.strategy)
        block.commit(chosen, tokens)
        step += 1


def _denoise_said(block: _Block, dc: DecodeConfig) -> None:
    """The public SAID code's stage loop (a fixed number of steps per stage, the
    §3.4 schedule over the stage's masked count at its start), except that a
    stage stops at its last commit instead of running forwards that commit
    nothing."""
    b, k = dc.block_length, dc.said_stages
    chlg = dc.strategy == "said_chlg"
    budget = dc.said_steps_per_stage
    for stage in range(k):
        members = [p for p in range(b) if _stage_of(p, k) == stage]
        if chlg and stage == k - 1:
            _reconstruct_chlg(block, dc, members)
            continue
        schedule = _schedule(sum(p in block.masked for p in members), budget[stage])
        for n in schedule:
            candidates = sorted(p for p in members if p in block.masked)
            if not candidates:
                break
            tokens, confidence, _ = block.score()
            above = []
            if dc.said_threshold is not None:
                above = [p for p in candidates if confidence[p] > dc.said_threshold]
            chosen = above if len(above) >= n else _most_confident(candidates, confidence, n)
            block.commit(chosen, tokens)
        assert not any(p in block.masked for p in members), "the stage's schedule left masks"


def _reconstruct_chlg(block: _Block, dc: DecodeConfig, members: list[int]) -> None:
    step = 0
    while any(p in block.masked for p in members):
        tokens, confidence, _ = block.score()
        candidates = sorted(p for p in members if p in block.masked)
        if step == 0:
            chosen = [p for p in candidates if confidence[p] >= dc.chlg_threshold]
            chosen = chosen or _most_confident(candidates, confidence, 1)
        else:
            steps_left = max(dc.chlg_extra_steps - (step - 1), 1)
            chosen = _most_confident(candidates, confidence, -(-len(candidates) // steps_left))
        block.commit(chosen, tokens)
        step += 1


def reference_generate(
    params: dict, config: ModelConfig, prompt: list[int], dc: DecodeConfig, canvas_len: int,
    key: jax.Array | None = None,
) -> ReferenceResult:
    """Block-diffusion decoding of one prompt, under the config's logits convention.

    Args:
      params, config: the model.
      prompt: the prompt's token ids (P >= 1).
      dc: decoding knobs (mode "diffusion").
      canvas_len: length of the forward pass (>= the canvas; fixed so the
        reference compiles once per length).
      key: this sequence's PRNG key (needed when dc.temperature > 0).
    """
    assert dc.mode == "diffusion"
    assert dc.temperature == 0.0 or key is not None
    shifted = config.logits_convention == "shifted"
    b, g, p = dc.block_length, dc.max_new_tokens, len(prompt)
    end = -(-(p + g) // b) * b
    assert end <= canvas_len
    canvas = np.full(canvas_len, config.mask_token_id, np.int32)
    canvas[:p] = prompt
    forward = _full_forward(config, b)
    forwards = committed = 0
    steps_per_block = []
    for index, start in enumerate(range((p // b) * b, end, b)):
        block_key = None if key is None else jax.random.fold_in(key, index)
        masked = {i for i in range(b) if start + i >= p}
        block = _Block(forward, params, canvas, start, masked, dc, shifted, block_key)
        if dc.strategy in ("said", "said_chlg"):
            _denoise_said(block, dc)
        else:
            _denoise_plain(block, dc)
        forwards += block.forwards
        committed += block.committed
        steps_per_block.append(block.forwards)
        generated = [int(canvas[i]) for i in range(max(start, p), min(start + b, p + g))]
        if any(t in dc.stop_ids for t in generated):
            break
    tokens = [int(t) for t in canvas[p : p + g]]
    for i, t in enumerate(tokens):
        if t in dc.stop_ids:
            tokens = tokens[: i + 1]
            break
    return ReferenceResult(tokens, forwards, committed, steps_per_block)
