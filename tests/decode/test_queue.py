"""Per-row block progress and continuous batching against decoding each prompt alone.

Prompts of lengths 5, 8, 11, 3 and 8 (mid-block and on a block boundary)
decode through fewer slots than prompts; a stop id taken from an unstopped
run gives mixed output lengths, so slots free up at different forwards and
later prompts are prefilled into them. Every result must equal the decoding
of its prompt alone (a batch of one, padded to the same bucket), which
test_decoder.py checks against the reference decoder. Sampled decoding
(one key per prompt) gives varied outputs on this small random model.
"""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax import perf
from sdar_jax.config import get_preset
from sdar_jax.decode.decoder import DecodeConfig, Hooks, generate, generate_many
from sdar_jax.model import transformer

MAX_NEW = 12
PROMPTS = [[3, 14, 15, 9, 26], [5, 35, 8, 9, 7, 9, 3, 2], [38, 4, 6, 26, 43, 3, 8, 32, 7, 9, 5],
           [7, 7, 2], [9, 30, 31, 5, 6, 7, 8, 40]]
WIDTH = 11


@pytest.fixture(scope="module")
def model():
    config = get_preset("tiny", vocab_size=64, num_layers=2, mask_token_id=63, eos_token_id=1)
    params = transformer.init_params(config, jax.random.key(0))
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 20
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20
    return config, params


def _padded(prompts):
    tokens = np.zeros((len(prompts), WIDTH), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def _alone(config, params, dc, keys):
    """Each prompt decoded as a batch of one."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        tokens, lengths = _padded([prompt])
        out.append(jax.device_get(generate(params, config, tokens, lengths, keys[i : i + 1], dc)))
    return out


def _assert_same(result, alone, forwards=True):
    for i, one in enumerate(alone):
        n = int(one.lengths[0])
        assert int(result.lengths[i]) == n, i
        np.testing.assert_array_equal(result.tokens[i], one.tokens[0])
        np.testing.assert_array_equal(result.canvas[i], one.canvas[0])
        if forwards:
            assert int(result.num_forwards[i]) == int(one.num_forwards[0]), i
            assert int(result.num_committed[i]) == int(one.num_committed[0]), i
            np.testing.assert_array_equal(result.steps_per_block[i], one.steps_per_block[0])


def _stop_id(config, params, dc, keys, num_slots):
    """A token that, as a stop id, cuts the prompts' outputs at the most different lengths.

    Found from a run stopping only on the mask id (the same compilation: the
    stop ids' values are traced)."""
    tokens, lengths = _padded(PROMPTS)
    free = jax.device_get(generate_many(params, config, tokens, lengths, keys,
                                        dataclasses.replace(dc, stop_ids=(config.vocab_size - 1,)),
                                        num_slots=num_slots))

    def cut_lengths(token):
        hits = free.tokens == token
        return set(np.where(hits.any(-1), hits.argmax(-1), MAX_NEW).tolist())

    return max(sorted(set(free.tokens[free.tokens >= 0].tolist())), key=lambda t: len(cut_lengths(t)))


STRATEGIES = [
    ("sequential", dict(steps=2)),
    ("low_confidence_static", dict(steps=3)),
    ("low_confidence_dynamic", dict(steps=4, threshold=0.5)),
    ("entropy_bounded", dict(eb_bound=1.5)),
    ("said", dict(said_stages=2, steps=3, said_rec_steps=1)),
    ("said_chlg", dict(said_stages=2, steps=4, chlg_extra_steps=1, chlg_threshold=0.5)),
]


@pytest.mark.parametrize("strategy,knobs", STRATEGIES)
def test_queue_equals_each_prompt_alone(model, strategy, knobs):
    config, params = model
    keys = jax.random.split(jax.random.key(1), len(PROMPTS))
    dc = DecodeConfig(block_length=4, strategy=strategy, max_new_tokens=MAX_NEW, temperature=1.0,
                      **knobs)
    dc = dataclasses.replace(dc, stop_ids=(_stop_id(config, params, dc, keys, 2),))
    tokens, lengths = _padded(PROMPTS)
    result = jax.device_get(generate_many(params, config, tokens, lengths, keys, dc, num_slots=2))
    alone = _alone(config, params, dc, keys)
    _assert_same(result, alone)
    assert len(set(result.lengths.tolist())) > 1  # mixed output lengths
    # Two slots, no forward wasted: exactly the first-in-first-out queue's makespan.
    assert int(result.batch_forwards) == perf.queue_forwards(result.num_forwards.tolist(), 2)


@pytest.mark.parametrize("convention", ["same_position", "shifted"])
def test_per_row_progress_sampled_and_fused_layouts(model, convention):
    """Rows of one batch at their own pace: the batch runs exactly its slowest row's
    forwards; sampled rows equal their decoding alone; both fused layouts agree."""
    config, params = model
    config = config.replace(logits_convention=convention)
    keys = jax.random.split(jax.random.key(2), len(PROMPTS))
    dc = DecodeConfig(block_length=4, steps=4, strategy="low_confidence_dynamic", threshold=0.6,
                      temperature=0.8, top_k=20, max_new_tokens=MAX_NEW)
    tokens, lengths = _padded(PROMPTS)
    batch = jax.device_get(generate(params, config, tokens, lengths, keys, dc))
    _assert_same(batch, _alone(config, params, dc, keys))
    assert int(batch.batch_forwards) == int(batch.num_forwards.max())
    # Lock-step blocks would cost the sum over blocks of the per-block maxima.
    lock_step = int(batch.steps_per_block.max(axis=0).sum())
    assert int(batch.batch_forwards) < lock_step
    always = jax.device_get(generate(params, config, tokens, lengths, keys,
                                     dataclasses.replace(dc, fused_forward="always")))
    np.testing.assert_array_equal(always.canvas, batch.canvas)
    np.testing.assert_array_equal(always.steps_per_block, batch.steps_per_block)


def test_ar_queue_and_finish_hook(model):
    """AR mode through 2 slots equals each prompt alone; on_finish reports every
    prompt once, with its tokens."""
    config, params = model
    config = config.replace(mask_token_id=None)
    keys = jax.random.split(jax.random.key(3), len(PROMPTS))
    dc = DecodeConfig(mode="ar", max_new_tokens=MAX_NEW, temperature=1.0)
    dc = dataclasses.replace(dc, stop_ids=(_stop_id(config, params, dc, keys, 2),))
    reported = {}

    def on_finish(items, finished, tokens, lengths, forwards, committed):
        for i in np.flatnonzero(np.asarray(finished)):
            item = int(items[i])
            assert item not in reported
            reported[item] = np.asarray(tokens[i, : int(lengths[i])]).tolist()

    tokens, lengths = _padded(PROMPTS)
    result = jax.device_get(generate_many(params, config, tokens, lengths, keys, dc, num_slots=2,
                                          hooks=Hooks(on_finish=on_finish)))
    _assert_same(result, _alone(config, params, dc, keys))
    assert len(set(result.lengths.tolist())) > 1
    assert int(result.batch_forwards) == perf.queue_forwards(result.num_forwards.tolist(), 2)
    assert sorted(reported) == list(range(len(PROMPTS)))
    for i in range(len(PROMPTS)):
        assert reported[i] == result.tokens[i, : int(result.lengths[i])].tolist()


def test_hooks_pause_and_resume_one_executable(model):
    """With hooks the loop hands its state to the host after forwards that complete
    blocks or finish sequences and resumes it: the same tokens and forwards as one
    uninterrupted call, the same compiled program (hooks are not part of it), and
    the hooks see every block and every sequence once, in order."""
    config, params = model
    params = jax.device_put(params, jax.devices()[0])  # committed, as the CLI loads them
    keys = jax.random.split(jax.random.key(4), len(PROMPTS))
    dc = DecodeConfig(block_length=4, steps=4, strategy="low_confidence_dynamic", threshold=0.5,
                      temperature=1.0, max_new_tokens=MAX_NEW)
    dc = dataclasses.replace(dc, stop_ids=(_stop_id(config, params, dc, keys, 2),))
    tokens, lengths = _padded(PROMPTS)
    whole = jax.device_get(generate_many(params, config, tokens, lengths, keys, dc, num_slots=2))
    compiles = []

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    # Host copy of the queue: the first prompts in slots 0, 1; a freed slot takes
    # the next prompt (lowest slot first).
    slot_item, next_item = [0, 1], 2
    blocks, finished = collections.defaultdict(list), []

    def stream(block_index, block_tokens, start, done):
        for slot in np.flatnonzero(done):
            blocks[slot_item[slot]].append((int(block_index[slot]), int(start[slot]),
                                            block_tokens[slot].tolist()))

    def on_finish(items, done, tokens, lengths, forwards, committed):
        nonlocal next_item
        for slot in np.flatnonzero(done):
            assert int(items[slot]) == slot_item[slot]
            finished.append((slot_item[slot], tokens[slot, : lengths[slot]].tolist(),
                             int(forwards[slot])))
        for slot in np.flatnonzero(done):
            slot_item[slot], next_item = next_item, next_item + 1

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        paused = jax.device_get(generate_many(params, config, tokens, lengths, keys, dc,
                                              num_slots=2,
                                              hooks=Hooks(stream=stream, on_finish=on_finish)))
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert not compiles  # every chunk ran the programs the call without hooks compiled
    for field in ("tokens", "lengths", "canvas", "num_forwards", "steps_per_block",
                  "batch_forwards"):
        np.testing.assert_array_equal(getattr(paused, field), getattr(whole, field), field)
    assert sorted(item for item, *_ in finished) == list(range(len(PROMPTS)))
    for item, ids, forwards in finished:
        assert ids == whole.tokens[item, : whole.lengths[item]].tolist()
        assert forwards == int(whole.num_forwards[item])
        # Every block of the prompt, in order, with the tokens it ended with.
        assert [k for k, *_ in blocks[item]] == list(range(len(blocks[item])))
        assert len(blocks[item]) == int((whole.steps_per_block[item] > 0).sum())
        for _, start, block_tokens in blocks[item]:
            assert block_tokens == whole.canvas[item, start : start + 4].tolist()


def test_resuming_under_a_mesh_compiles_once():
    """Under a mesh the state `_start` returns is laid out like the one `_resume`
    returns, so the paused loop resumes in one executable; tokens equal one device."""
    from sdar_jax.decode import decoder
    from sdar_jax.model import sharding as model_sharding
    from sdar_jax.parallel import ParallelConfig, ShardingContext

    config = get_preset("tiny", vocab_size=64, num_layers=1, mask_token_id=63)
    params = transformer.init_params(config, jax.random.key(5))
    tokens, lengths = _padded(PROMPTS)
    dc = DecodeConfig(block_length=4, steps=2, strategy="low_confidence_static", max_new_tokens=8)
    want = jax.device_get(generate_many(params, config, tokens, lengths, jax.random.key(0), dc,
                                        num_slots=4))
    context = ShardingContext.from_config(ParallelConfig(data=2, fsdp=2, tensor=2))
    sharded = jax.device_put(params, model_sharding.param_shardings(config, context))
    finished = []
    compiled = decoder._resume._cache_size()
    with context.activate():
        got = jax.device_get(generate_many(
            sharded, config, tokens, lengths, jax.random.key(0), dc, num_slots=4,
            hooks=Hooks(on_finish=lambda items, done, *_: finished.extend(items[done].tolist()))))
    assert decoder._resume._cache_size() == compiled + 1
    assert sorted(finished) == list(range(len(PROMPTS)))
    np.testing.assert_array_equal(got.canvas, want.canvas)


@pytest.mark.parametrize("layout, temperature", [("per_layer", 0.0), ("out_major", 1.0)])
def test_decoding_layouts_decode_the_same_tokens(model, layout, temperature):
    """What generate and evaluate decode with (the layers split at load; at batch 1 on
    CPU the kernels out-major) equals decoding the params as stored."""
    config, params = model
    dc = DecodeConfig(block_length=4, steps=4, strategy="low_confidence_dynamic", threshold=0.9,
                      temperature=temperature, max_new_tokens=MAX_NEW, stop_ids=(1,))
    tokens, lengths = _padded(PROMPTS)
    keys = jax.random.split(jax.random.key(3), len(PROMPTS))
    relaid = transformer.unstack_layers(params)
    if layout == "out_major":
        relaid = transformer.out_major_kernels(relaid, config, min_size=0)
    want = jax.device_get(generate_many(params, config, tokens, lengths, keys, dc, num_slots=2))
    got = jax.device_get(generate_many(relaid, config, tokens, lengths, keys, dc, num_slots=2))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.num_forwards, want.num_forwards)


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_the_compiled_loop_never_copies_the_whole_cache(model, mode):
    """XLA copies a buffer that a `lax.cond` branch updates in place: the whole KV
    cache on every forward, when the width choice, the refill and the first
    prefill were conds (they are `decoder._run_if` loops now; this fails on
    them). Checked on the compiled program with the layers as separate buffers
    (how generate and evaluate decode), more prompts than slots (the refill
    compiled in) and fused_forward="when_needed" (the width choice)."""
    from sdar_jax.decode import decoder

    config, params = model
    dc = DecodeConfig(mode=mode, block_length=4, steps=4, strategy="low_confidence_dynamic",
                      threshold=0.9, max_new_tokens=MAX_NEW, stop_ids=(1,))
    tokens, lengths = _padded(PROMPTS)
    static, knobs = decoder._split(dc, 3)
    inputs = (transformer.unstack_layers(params), tokens, lengths,
              jax.random.split(jax.random.key(0), len(PROMPTS)), knobs)
    state = decoder._start(*inputs, config=config, static=static)
    cache_shape = ",".join(map(str, state.cache.k.shape))
    hlo = decoder._resume.lower(*inputs, state, jnp.int32(0), config=config,
                                static=static).compile().as_text()
    assert f"f32[{cache_shape}]" in hlo  # the cache is in the program under this name
    copies = [line.strip() for line in hlo.splitlines()
              if f"f32[{cache_shape}]" in line.split("=", 1)[-1].split("(", 1)[0]
              and " copy(" in line]
    assert copies == []
