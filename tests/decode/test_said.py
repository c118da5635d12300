"""SAID (spec §4): partition, the public code's step split, the per-step selection,
and the jitted decoder against the plain reference decoder."""

import csv
import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.config import get_preset
from sdar_jax.decode import said, strategies
from sdar_jax.decode.decoder import PAD_ID, DecodeConfig, canvas_length, generate
from sdar_jax.model import transformer
from tests.decode.reference_decoder import reference_generate

TABLE = os.path.join(os.path.dirname(__file__), "data", "said_public_stage_steps.csv")
CASES = list(itertools.product((4, 8, 16, 32), (1, 2, 3)))


@pytest.mark.parametrize("block_length,num_stages", CASES)
def test_partition_follows_the_checkerboard_rule(block_length, num_stages):
    stage = said.stage_partition(block_length, num_stages)
    # Rule: U_k = {p : lowest set bit of p is bit k-1} for k < K; the rest is R.
    for p in range(block_length):
        low_bit = next((k for k in range(1, num_stages) if p % 2**k == 2 ** (k - 1)), None)
        want = 0 if low_bit is None else num_stages - low_bit
        assert stage[p] == want, (p, stage.tolist())
    sizes = np.bincount(stage, minlength=num_stages).tolist()
    assert sum(sizes) == block_length
    if num_stages >= 2:
        assert sizes[-1] == block_length // 2  # the odd positions: the details
        assert sizes[0] == block_length // 2 ** (num_stages - 1)  # the scaffold grid


def test_partition_examples():
    assert said.stage_partition(8, 1).tolist() == [0] * 8
    assert said.stage_partition(8, 2).tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert said.stage_partition(8, 3).tolist() == [0, 2, 1, 2, 0, 2, 1, 2]
    assert said.stage_partition(16, 3).tolist()[:8] == [0, 2, 1, 2, 0, 2, 1, 2]


def test_partition_rejects_empty_stages():
    with pytest.raises(ValueError, match="num_stages=4"):
        said.stage_partition(4, 4)  # U_3 = {4} is outside a block of 4


@functools.lru_cache(maxsize=None)
def _public_table() -> dict[tuple[int, int, int], tuple[int, ...]]:
    with open(TABLE) as f:
        return {
            (int(r["num_stages"]), int(r["total_steps"]), int(r["rec_steps"])):
                tuple(int(s) for s in r["stage_steps"].split())
            for r in csv.DictReader(f)
        }


def test_split_equals_the_public_code_on_the_full_grid():
    table = _public_table()
    seen, refused = set(), 0
    for block_length in range(4, 65):
        for budget in range(0, block_length + 2):
            valid = 1 <= budget <= block_length
            for rec in (0, 1, 3):  # K = 1 ignores rec_steps
                if valid:
                    assert said.stage_steps(block_length, 1, budget, rec) == table[1, budget, 0]
                    seen.add((1, budget, 0))
                else:
                    with pytest.raises(ValueError, match=rf"must be in \[1, {block_length}\]"):
                        said.stage_steps(block_length, 1, budget, rec)
                    refused += 1
        for num_stages in range(2, 5):
            if block_length <= 2 ** (num_stages - 2):
                continue  # the partition has an empty stage (tested above)
            for budget in range(1, block_length + 2):
                for rec in range(0, budget + 1):
                    if budget <= block_length and 1 <= rec <= budget - (num_stages - 1):
                        got = said.stage_steps(block_length, num_stages, budget, rec)
                        assert got == table[num_stages, budget, rec], (block_length, got)
                        assert sum(got) == budget and min(got) >= 1
                        seen.add((num_stages, budget, rec))
                    else:
                        with pytest.raises(ValueError, match=r"said .* must be in \[\d+, \d+\]"):
                            said.stage_steps(block_length, num_stages, budget, rec)
                        refused += 1
    assert seen == set(table) and refused > 0  # every row of the table was reached


def test_split_examples_from_the_issue():
    # Where the earlier share-based split differed or refused (issue 19).
    assert said.stage_steps(16, 3, 8, 1) == (6, 1, 1)
    assert said.stage_steps(4, 2, 4, 1) == (3, 1)
    assert said.stage_steps(32, 4, 20, 2) == _public_table()[4, 20, 2]
    assert said.stage_steps(8, 1, 5, 1) == (5,)  # K = 1 ignores rec_steps


@pytest.mark.parametrize(
    "args,match",
    [
        ((8, 1, 9, 1), r"must be in \[1, 8\].*got 9$"),
        ((8, 1, 0, 1), r"must be in \[1, 8\].*got 0$"),
        ((8, 3, 2, 1), r"budget\) must be in \[3, 8\].*got 2$"),
        ((8, 2, 9, 1), r"budget\) must be in \[2, 8\].*got 9$"),
        ((8, 3, 8, 7), r"reconstruction steps must be in \[1, 6\].*got 7$"),
        ((8, 2, 4, 0), r"reconstruction steps must be in \[1, 7\].*got 0$"),
    ],
)
def test_split_refusals_are_one_line_naming_the_range(args, match):
    with pytest.raises(ValueError, match=match) as info:
        said.stage_steps(*args)
    assert "\n" not in str(info.value)


@functools.lru_cache(maxsize=None)
def _jitted_select(stage_of: tuple[int, ...], chlg: bool):
    def select(confidence, masked, state, steps_per_stage, chlg_threshold, chlg_extra_steps):
        return said.said_select(
            confidence, masked, state, stage_of=np.asarray(stage_of, np.int32),
            steps_per_stage=steps_per_stage, threshold=None,
            chlg_threshold=chlg_threshold if chlg else None,
            chlg_extra_steps=chlg_extra_steps if chlg else None,
        )

    return jax.jit(select)


def _select(confidence, masked, state, stage_of, steps_per_stage, chlg_threshold=None,
            chlg_extra_steps=None):
    """said_select (static rule), jitted once per partition."""
    chlg = chlg_threshold is not None
    return _jitted_select(tuple(stage_of.tolist()), chlg)(
        jnp.asarray(confidence, jnp.float32), jnp.asarray(masked), state,
        jnp.asarray(steps_per_stage, jnp.int32), jnp.float32(chlg_threshold or 0),
        jnp.int32(chlg_extra_steps or 0),
    )


def test_k1_selection_is_static_over_the_masked_count():
    rng = np.random.default_rng(0)
    for block_length in (4, 8, 16):
        stage_of = said.stage_partition(block_length, 1)
        for steps in range(1, block_length + 1):
            masked = rng.random((6, block_length)) < 0.7
            state = said.init_stage_state(6, 1)
            for step in range(steps):
                confidence = np.round(rng.random((6, block_length)), 1)
                got, state = _select(confidence, masked, state, stage_of, [steps])
                # Static rule over the masked count at the block's start (spec §3.4 on
                # the stage), independent of said.
                start = masked.sum(-1) if step == 0 else start
                count = strategies.step_count(step, steps, jnp.asarray(start))
                want = np.zeros_like(masked)
                for r in range(6):
                    order = sorted(np.flatnonzero(masked[r]), key=lambda i: (-confidence[r, i], i))
                    want[r, order[: int(count[r])]] = True
                np.testing.assert_array_equal(got, want)
                masked = masked & ~np.asarray(got)
            assert not masked.any()  # the schedule commits every masked position in `steps`


def test_selection_stays_in_the_current_stage_and_skips_finished_ones():
    # B=8, K=3: stage 0 = {0, 4}; row 0 has both masked, row 1 only the details.
    masked = np.array([[True] * 8, [False, True, False, True, False, True, False, True]])
    confidence = np.linspace(0.1, 0.9, 16).reshape(2, 8)
    commit, state = _select(confidence, masked, said.init_stage_state(2, 3),
                            said.stage_partition(8, 3), [2, 1, 1])
    np.testing.assert_array_equal(commit[0], [0, 0, 0, 0, 1, 0, 0, 0])
    # Row 1's stages 0 and 1 hold no mask: done, the details start in this forward.
    np.testing.assert_array_equal(commit[1], [0, 1, 0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(state.steps_done, [[1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(state.start_masked, [[2, 0, 0], [0, 0, 4]])


def test_steps_past_the_last_commit_are_skipped():
    # B=8, K=2, split (7, 1): the scaffold {0, 2, 4, 6} with 0 and 2 in the prompt
    # has 2 masked positions for 7 steps: 1 + 1 commits, then the details start
    # in the third forward (the public code would run 5 more scaffold forwards).
    stage_of = said.stage_partition(8, 2)
    masked = np.array([[False, False, False, True, True, True, True, True]])
    state = said.init_stage_state(1, 2)
    confidence = np.array([[0.0, 0.0, 0.0, 0.5, 0.3, 0.6, 0.9, 0.4]])
    commits = []
    while masked.any():
        commit, state = _select(confidence, masked, state, stage_of, [7, 1])
        commits.append(np.flatnonzero(commit[0]).tolist())
        masked = masked & ~np.asarray(commit)
    assert commits == [[6], [4], [3, 5, 7]]
    np.testing.assert_array_equal(state.steps_done, [[2, 1]])
    np.testing.assert_array_equal(state.start_masked, [[2, 3]])


def test_per_step_count_is_over_the_stage_masked_count_at_its_start():
    # B=16, K=2, 3 steps for the scaffold: 8 positions, 3 of them in the prompt.
    # The schedule over the 5 masked is 2, 2, 1 (over the stage's size it would
    # be 3, 3, 2, committing the 5 in two steps).
    stage_of = said.stage_partition(16, 2)
    masked = np.arange(16)[None] >= 5
    state = said.init_stage_state(1, 2)
    confidence = np.linspace(0.2, 0.9, 16)[None]
    counts = []
    for _ in range(3):
        commit, state = _select(confidence, masked, state, stage_of, [3, 1])
        counts.append(int(commit.sum()))
        masked = masked & ~np.asarray(commit)
    assert counts == [2, 2, 1]


def test_rows_without_masks_take_no_step_and_reset_rows():
    stage_of = said.stage_partition(4, 2)
    state = said.StageState(jnp.array([[2, 1], [1, 0]]), jnp.array([[2, 2], [2, 0]]))
    commit, new = _select(np.ones((2, 4)) * 0.5, np.zeros((2, 4), bool), state, stage_of, [2, 2])
    assert not commit.any()
    np.testing.assert_array_equal(new.steps_done, state.steps_done)
    reset = said.reset_rows(state, jnp.array([False, True]))
    np.testing.assert_array_equal(reset.steps_done, [[2, 1], [0, 0]])
    np.testing.assert_array_equal(reset.start_masked, [[2, 2], [0, 0]])


def test_chlg_commits_confident_at_once_then_spreads_the_rest():
    stage_of = said.stage_partition(8, 2)  # details = odd positions
    masked = np.array([[False, True, False, True, False, True, False, True]])
    confidence = np.array([[0.0, 0.85, 0.0, 0.3, 0.0, 0.95, 0.0, 0.5]])
    state = said.StageState(jnp.array([[3, 0]]), jnp.array([[4, 0]]))
    kwargs = dict(chlg_threshold=0.8, chlg_extra_steps=3)
    commit, _ = _select(confidence, masked, state, stage_of, [3, 4], **kwargs)
    np.testing.assert_array_equal(commit[0], [0, 1, 0, 0, 0, 1, 0, 0])
    # Nothing above tau: still commits the most confident one.
    low = confidence * 0.5
    commit, after_pass = _select(low, masked, state, stage_of, [3, 4], **kwargs)
    np.testing.assert_array_equal(commit[0], [0, 0, 0, 0, 0, 1, 0, 0])
    # Extra steps: 3 left over 3 steps -> ceil(3/3) = 1, most confident first.
    commit, _ = _select(low, masked & ~np.asarray(commit), after_pass, stage_of, [3, 4], **kwargs)
    np.testing.assert_array_equal(commit[0], [0, 1, 0, 0, 0, 0, 0, 0])


# The jitted decoder against the reference decoder. Prompt lengths 3 and 13 end
# mid-block, 8 on a block boundary (B = 4 and 8); a tiny random model with a
# scaled embedding and head spreads confidences over (0.2, 1).
MAX_NEW = 12
PROMPTS = [[3, 14, 15], [5, 35, 8, 9, 7, 9, 3, 2], [38, 4, 6, 26, 43, 3, 8, 32, 7, 9, 5, 12, 40]]


@pytest.fixture(scope="module")
def model():
    config = get_preset("tiny", vocab_size=64, num_layers=2, mask_token_id=63, eos_token_id=1)
    params = transformer.init_params(config, jax.random.key(1))
    for name, leaf in (("embed_tokens", "embedding"), ("lm_head", "kernel")):
        params[name][leaf] = params[name][leaf] * 20
    return config, params


def _decode_and_compare(model, dc):
    """Decodes PROMPTS as one ragged batch; every row must equal the reference
    decoding of its prompt alone. Returns (prompt length, block start, forwards)
    for every block of every row."""
    config, params = model
    width = max(len(p) for p in PROMPTS)
    tokens = np.zeros((len(PROMPTS), width), np.int32)
    for r, p in enumerate(PROMPTS):
        tokens[r, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
    result = jax.device_get(generate(params, config, jnp.asarray(tokens), lengths,
                                     jax.random.key(0), dc))
    blocks = []
    for r, prompt in enumerate(PROMPTS):
        ref = reference_generate(params, config, prompt, dc, canvas_length(width, dc))
        n = int(result.lengths[r])
        assert result.tokens[r, :n].tolist() == ref.tokens, (dc, r)
        assert np.all(result.tokens[r, n:] == PAD_ID)
        assert int(result.num_forwards[r]) == ref.num_forwards, (dc, r)
        assert int(result.num_committed[r]) == ref.num_committed, (dc, r)
        per_block = result.steps_per_block[r]
        assert per_block[: len(ref.steps_per_block)].tolist() == ref.steps_per_block, (dc, r)
        assert not per_block[len(ref.steps_per_block):].any()
        first = len(prompt) // dc.block_length * dc.block_length
        blocks += [(len(prompt), first + i * dc.block_length, f)
                   for i, f in enumerate(ref.steps_per_block)]
    return blocks


def _static_said_forwards(dc, prompt_length, start):
    """Forwards of a block under the public split with the no-op steps skipped:
    per stage, min(its steps, its masked positions at the block's start)."""
    stage_of = said.stage_partition(dc.block_length, dc.said_stages)
    masked = np.arange(start, start + dc.block_length) >= prompt_length
    return sum(min(steps, int(np.sum(masked & (stage_of == j))))
               for j, steps in enumerate(dc.said_steps_per_stage))


SAID_GRID = [
    (4, 2, dict(steps=4, said_rec_steps=1)),
    (4, 2, dict(steps=2, said_rec_steps=1)),
    (8, 2, dict(steps=8, said_rec_steps=1)),
    (8, 2, dict(steps=5, said_rec_steps=2)),
    (8, 2, dict(steps=3, said_rec_steps=2)),
    (8, 3, dict(steps=8, said_rec_steps=1)),
    (8, 3, dict(steps=6, said_rec_steps=3)),
    (8, 3, dict(steps=3, said_rec_steps=1)),
]


@pytest.mark.parametrize("block_length,num_stages", sorted({c[:2] for c in SAID_GRID}))
def test_said_decoder_matches_reference_and_skips_no_op_steps(model, block_length, num_stages):
    skipped_blocks = 0
    for b, k, knobs in SAID_GRID:
        if (b, k) != (block_length, num_stages):
            continue
        dc = DecodeConfig(block_length=b, strategy="said", said_stages=k,
                          max_new_tokens=MAX_NEW, **knobs)
        for prompt_length, start, forwards in _decode_and_compare(model, dc):
            assert forwards <= dc.steps
            assert forwards == _static_said_forwards(dc, prompt_length, start), (dc, start)
            skipped_blocks += forwards < dc.steps
    assert skipped_blocks > 0  # the skip really happened (first blocks, big budgets)


@pytest.mark.parametrize(
    "block_length,strategy,knobs",
    [
        (8, "said", dict(said_stages=3, steps=8, said_rec_steps=2, said_threshold=0.6)),
        (8, "said_chlg", dict(said_stages=2, steps=8, chlg_extra_steps=3, chlg_threshold=0.8)),
        (8, "said_chlg", dict(said_stages=3, steps=7, chlg_extra_steps=3, chlg_threshold=0.5)),
    ],
)
def test_dynamic_and_chlg_decoder_matches_reference(model, block_length, strategy, knobs):
    dc = DecodeConfig(block_length=block_length, strategy=strategy, max_new_tokens=MAX_NEW, **knobs)
    blocks = _decode_and_compare(model, dc)
    assert all(forwards <= dc.steps for *_, forwards in blocks)
