"""The jitted decoder against the plain reference decoder and transformers' generate.

A tiny random SDAR model whose embedding and head are scaled up so that
confidences spread over (0.2, 1): dynamic thresholds then commit several
positions in some steps and one in others (checked below, so the equality
tests can fail). Prompts of lengths 5, 8 and 11 decode together in one ragged
batch and are compared row by row with the reference, which decodes each
prompt alone; 8 ends on a block boundary for every block size, 5 and 11 end
mid-block for B >= 2. `steps`, thresholds and bounds are traced, so each
(block length, strategy) compiles once. Every equality test runs under both
logits conventions (spec §2.7); sampled decoding is compared with the
reference too, with one key per row.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.config import get_preset
from sdar_jax.decode.decoder import PAD_ID, DecodeConfig, canvas_length, generate
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec
from tests.decode.reference_decoder import reference_generate

MAX_NEW = 12
PROMPTS = [[3, 14, 15, 9, 26], [5, 35, 8, 9, 7, 9, 3, 2], [38, 4, 6, 26, 43, 3, 8, 32, 7, 9, 5]]


CONVENTIONS = ("same_position", "shifted")


@pytest.fixture(scope="module")
def same_position_model():
    config = get_preset("tiny", vocab_size=64, num_layers=2, mask_token_id=63, eos_token_id=1)
    params = transformer.init_params(config, jax.random.key(0))
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 20
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20
    return config, params


@pytest.fixture(scope="module", params=CONVENTIONS)
def model(request, same_position_model):
    config, params = same_position_model
    return config.replace(logits_convention=request.param), params


def _batch(prompts):
    width = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def _decode(model, dc, prompts=PROMPTS, rng=None):
    config, params = model
    tokens, lengths = _batch(prompts)
    rng = jax.random.key(0) if rng is None else rng
    return jax.device_get(generate(params, config, tokens, lengths, rng, dc))


def _check_against_reference(model, dc, result, keys=None):
    """Every row equals the reference decoding of its prompt alone (with its own
    key when sampling); returns the reference's steps per block, per row."""
    config, params = model
    canvas_len = canvas_length(max(len(p) for p in PROMPTS), dc)
    steps = []
    for r, prompt in enumerate(PROMPTS):
        key = None if keys is None else keys[r]
        ref = reference_generate(params, config, prompt, dc, canvas_len, key)
        n = int(result.lengths[r])
        assert result.tokens[r, :n].tolist() == ref.tokens, (dc, r)
        assert np.all(result.tokens[r, n:] == PAD_ID)
        assert int(result.num_forwards[r]) == ref.num_forwards, (dc, r)
        assert int(result.num_committed[r]) == ref.num_committed, (dc, r)
        blocks = result.steps_per_block[r]
        assert blocks[: len(ref.steps_per_block)].tolist() == ref.steps_per_block, (dc, r)
        assert not blocks[len(ref.steps_per_block) :].any()
        steps.append(ref.steps_per_block)
    return steps


def _knob_grid(strategy, block_length, full=True):
    """Knob settings to compare; a thinner grid (`full=False`) for the second convention."""
    if strategy == "entropy_bounded":
        return [dict(eb_bound=bound, steps=block_length) for bound in (0.05, 1.5, 6.0)]
    steps = range(1, block_length + 1) if full else sorted({1, max(block_length // 2, 1), block_length})
    grid = [dict(steps=s) for s in steps]
    if strategy == "low_confidence_dynamic":
        grid = [dict(g, threshold=t) for g in grid for t in (0.35, 0.7)]
    return grid


@pytest.mark.parametrize("block_length", [1, 2, 4, 8])
@pytest.mark.parametrize(
    "strategy", ["sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded"]
)
def test_matches_reference(model, block_length, strategy):
    multi_commit_steps, single_commit_blocks = 0, 0
    full = model[0].logits_convention == "same_position"
    for knobs in _knob_grid(strategy, block_length, full):
        dc = DecodeConfig(block_length=block_length, strategy=strategy, max_new_tokens=MAX_NEW,
                          **knobs)
        result = _decode(model, dc)
        steps = _check_against_reference(model, dc, result)
        # Full blocks (not the first, which may hold a prompt tail) decoded in
        # fewer forwards than positions committed several tokens in a step.
        full = [s for row in steps for s in row[1:]]
        multi_commit_steps += sum(s < block_length for s in full)
        single_commit_blocks += sum(s == block_length for s in full)
        if strategy in ("sequential", "low_confidence_static"):
            assert all(s == knobs["steps"] for s in full)
    if strategy in ("low_confidence_dynamic", "entropy_bounded") and block_length > 1:
        assert multi_commit_steps > 0 and single_commit_blocks > 0


@pytest.mark.parametrize(
    "block_length,strategy,said_kwargs",
    [
        (8, "said", dict(said_stages=1, steps=5)),
        (8, "said", dict(said_stages=2, steps=4, said_rec_steps=1)),
        (8, "said", dict(said_stages=3, steps=6, said_rec_steps=2, said_threshold=0.6)),
        (4, "said_chlg", dict(said_stages=2, steps=4, chlg_extra_steps=1, chlg_threshold=0.5)),
        (8, "said_chlg", dict(said_stages=3, steps=6, chlg_extra_steps=3, chlg_threshold=0.5)),
    ],
)
def test_said_matches_reference(model, block_length, strategy, said_kwargs):
    dc = DecodeConfig(block_length=block_length, strategy=strategy, max_new_tokens=MAX_NEW,
                      **said_kwargs)
    result = _decode(model, dc)
    _check_against_reference(model, dc, result)
    if said_kwargs["said_stages"] == 1:
        # K = 1 is low_confidence_static for a prompt ending on a block boundary (row 1);
        # SAID's schedule counts a block's masked positions, not B, so prompt tails differ.
        static = _decode(model, DecodeConfig(
            block_length=block_length, strategy="low_confidence_static", steps=said_kwargs["steps"],
            max_new_tokens=MAX_NEW))
        np.testing.assert_array_equal(result.canvas[1], static.canvas[1])
        np.testing.assert_array_equal(result.steps_per_block[1], static.steps_per_block[1])


@pytest.mark.parametrize(
    "strategy,knobs",
    [
        ("sequential", dict(steps=2)),
        ("low_confidence_static", dict(steps=3)),
        ("low_confidence_dynamic", dict(steps=2, threshold=0.5)),
        ("entropy_bounded", dict(eb_bound=1.5)),
        ("said", dict(said_stages=2, steps=3, said_rec_steps=1)),
        ("said_chlg", dict(said_stages=2, steps=4, chlg_extra_steps=1, chlg_threshold=0.5)),
    ],
)
def test_sampled_matches_reference(model, strategy, knobs):
    dc = DecodeConfig(block_length=4, strategy=strategy, max_new_tokens=MAX_NEW,
                      temperature=0.9, top_k=20, top_p=0.9, **knobs)
    keys = jax.random.split(jax.random.key(5), len(PROMPTS))
    result = _decode(model, dc, rng=keys)
    _check_against_reference(model, dc, result, keys)
    greedy = _decode(model, dataclasses.replace(dc, temperature=0.0, top_k=0, top_p=1.0))
    assert not np.array_equal(greedy.tokens, result.tokens)


def test_shifted_reads_the_previous_output(same_position_model):
    """The conventions decode differently, and under "shifted" a block's first
    position is the AR prediction of the previous position."""
    config, params = same_position_model
    shifted = config.replace(logits_convention="shifted")
    dc = DecodeConfig(block_length=4, steps=4, strategy="low_confidence_static",
                      max_new_tokens=MAX_NEW)
    same = _decode((config, params), dc)
    moved = _decode((shifted, params), dc)
    assert not np.array_equal(same.tokens, moved.tokens)
    # Row 1's prompt (8 tokens) ends on a block boundary: its first generated
    # token is the block-causal prefill's prediction at the last prompt token.
    prompt = jnp.asarray([PROMPTS[1]])
    logits = transformer.apply(
        shifted, params, prompt, jnp.arange(8)[None], mask=MaskSpec("block_causal", 4)).logits
    assert int(moved.tokens[1, 0]) == int(jnp.argmax(logits[0, -1]))


def test_stop_ids_freeze_rows(same_position_model):
    model = same_position_model  # the conventions share this code; both are compared above
    config, _ = model
    base = DecodeConfig(block_length=4, steps=4, strategy="low_confidence_dynamic",
                        threshold=0.5, max_new_tokens=MAX_NEW)
    free = _decode(model, base)
    # A token first generated in a middle block of row 1 becomes the stop id.
    stop = int(free.tokens[1, 5])
    dc = dataclasses.replace(base, stop_ids=(stop,))
    result = _decode(model, dc)
    _check_against_reference(model, dc, result)
    assert int(result.lengths[1]) < MAX_NEW
    for r, prompt in enumerate(PROMPTS):
        n = int(result.lengths[r])
        if n == MAX_NEW:
            continue
        assert result.tokens[r, n - 1] == stop and stop not in result.tokens[r, : n - 1].tolist()
        # Frozen: nothing after the stop's block was decoded.
        block_end = -(-(len(prompt) + n) // 4) * 4
        assert np.all(result.canvas[r, block_end:] == config.mask_token_id)
        assert result.num_forwards[r] < free.num_forwards[r]


def test_ragged_batch_equals_each_row_alone_and_sampling_is_per_row(same_position_model):
    model = same_position_model  # the conventions share this code; both are compared above
    dc = DecodeConfig(block_length=4, steps=4, strategy="low_confidence_dynamic", threshold=0.5,
                      temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=MAX_NEW)
    keys = jax.random.split(jax.random.key(3), len(PROMPTS))
    batch = _decode(model, dc, rng=keys)
    for r, prompt in enumerate(PROMPTS):
        # Alone, padded to the same bucket (one compilation for all rows).
        padded = [prompt + [0] * (11 - len(prompt))]
        config, params = model
        tokens, _ = _batch(padded)
        alone = jax.device_get(generate(params, config, tokens, jnp.array([len(prompt)]),
                                        keys[r : r + 1], dc))
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[r])
        assert alone.num_forwards[0] == batch.num_forwards[r]
    # Sampling really samples: another key gives other tokens.
    other = _decode(model, dc, rng=jax.random.split(jax.random.key(4), len(PROMPTS)))
    assert not np.array_equal(other.tokens, batch.tokens)


def test_prompt_bucket_padding_does_not_change_greedy_tokens(same_position_model):
    model = same_position_model  # the conventions share this code; both are compared above
    dc = DecodeConfig(block_length=4, steps=2, strategy="low_confidence_dynamic", threshold=0.5,
                      max_new_tokens=MAX_NEW)
    batch = _decode(model, dc)
    alone = _decode(model, dc, prompts=[PROMPTS[0]])
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[0])
    assert float(batch.tokens_per_forward[0]) == pytest.approx(
        int(batch.num_committed[0]) / int(batch.num_forwards[0]))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(strategy="fastest"), "low_confidence_dynamic"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(steps=5), "steps"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(mode="beam"), "mode"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(strategy="said", said_stages=3, steps=2, said_rec_steps=1), "budget"),
    ],
)
def test_bad_decode_config(change, match):
    with pytest.raises(ValueError, match=match):
        DecodeConfig(block_length=4, **change)


def test_bad_inputs(model):
    config, params = model
    dc = DecodeConfig(max_new_tokens=4)
    tokens, lengths = _batch(PROMPTS)
    with pytest.raises(ValueError, match="empty prompts"):
        generate(params, config, tokens, lengths.at[0].set(0), jax.random.key(0), dc)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(params, config, tokens, lengths, jax.random.key(0),
                 DecodeConfig(max_new_tokens=config.max_position_embeddings))
    with pytest.raises(ValueError, match="mask_token_id"):
        generate(params, config.replace(mask_token_id=None), tokens, lengths, jax.random.key(0), dc)


@pytest.mark.parametrize(
    "convention,block_length,strategy,knobs",
    [
        ("shifted", 4, "low_confidence_dynamic", dict(steps=4, threshold=0.35)),
        ("same_position", 8, "low_confidence_dynamic", dict(steps=4, threshold=0.7)),
        ("shifted", 8, "said_chlg", dict(said_stages=3, steps=6, chlg_extra_steps=3,
                                         chlg_threshold=0.5)),
        ("shifted", 4, "low_confidence_static", dict(steps=2, temperature=0.9, top_k=20)),
    ],
)
def test_causal_block_attention_matches_reference(convention, block_length, strategy, knobs):
    """block_attention="causal" (docs/adaptation.md): the decoder equals the reference decoder, whose
    forward then uses the plain causal mask, and differs from bidirectional decoding."""
    config = get_preset("tiny", vocab_size=64, num_layers=2, mask_token_id=63, eos_token_id=1)
    params = transformer.init_params(config, jax.random.key(0))
    # Scaled less than same_position_model's, whose greedy text barely depends on the context.
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 5
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 5
    causal = (config.replace(logits_convention=convention, block_attention="causal"), params)
    dc = DecodeConfig(block_length=block_length, strategy=strategy, max_new_tokens=MAX_NEW, **knobs)
    keys = jax.random.split(jax.random.key(5), len(PROMPTS)) if "temperature" in knobs else None
    result = _decode(causal, dc, rng=keys)
    _check_against_reference(causal, dc, result, keys)
    bidirectional = _decode((config.replace(logits_convention=convention), params), dc, rng=keys)
    assert not np.array_equal(bidirectional.tokens, result.tokens)
