"""Batched evaluation: bucketing, bookkeeping against independent counts, end-to-end decoding."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdar_jax.config import get_preset
from sdar_jax.data import tasks
from sdar_jax.data.tokenizer import load_char_tokenizer
from sdar_jax.decode import decoder
from sdar_jax.decode.decoder import DecodeConfig, DecodeResult
from sdar_jax.eval import runner
from sdar_jax.model import transformer

TOK = load_char_tokenizer()
STOP = TOK.stop_token_ids  # (<|endoftext|>, <|im_end|>)


# ---- bucketing -----------------------------------------------------------------------------------

def test_bucket_boundaries_cover_every_length_with_at_most_n_buckets():
    lengths = [26, 27, 28, 25, 33, 44, 40, 62, 70, 65, 5]
    for n in (1, 2, 3, 5):
        bounds = runner.bucket_boundaries(lengths, n, multiple=8)
        assert 1 <= len(bounds) <= n
        assert bounds == sorted(set(bounds))
        assert all(b % 8 == 0 for b in bounds)
        assert bounds[-1] == 72  # longest prompt 70, rounded up to 8
    assert runner.bucket_boundaries([3, 3, 3], 4, multiple=1) == [3]


def test_plan_batches_places_each_row_once_in_its_smallest_bucket():
    lengths = [26, 27, 70, 40, 28, 65, 33]
    bounds = [32, 48, 72]
    plans = runner.plan_batches(lengths, n_samples=3, boundaries=bounds, batch_size=4)
    rows = [r for p in plans for r in p.rows]
    assert sorted(rows) == [(e, s) for e in range(len(lengths)) for s in range(3)]
    for p in plans:
        assert p.batch_size == min(4, len(p.rows))  # slots of continuous batching
        for e, _ in p.rows:
            assert p.bucket_length == min(b for b in bounds if b >= lengths[e])
    # One decoder call (one shape) per bucket.
    assert len(plans) == len({p.bucket_length for p in plans}) == 3
    with pytest.raises(ValueError, match="exceeds the last bucket"):
        runner.plan_batches([80], 1, [72], 4)


def test_settings_and_sampling_checks():
    with pytest.raises(ValueError, match="ks"):
        runner.EvalSettings(n_samples=2, ks=(1, 3))
    with pytest.raises(ValueError, match="style"):
        runner.EvalSettings(style="gsm9k")
    cfg = get_preset("tiny", vocab_size=104, num_layers=1, mask_token_id=4)
    with pytest.raises(ValueError, match="temperature > 0"):
        runner.evaluate({}, cfg, TOK, [{"prompt": "1+1=?", "answer": "2"}],
                        DecodeConfig(temperature=0.0), runner.EvalSettings(n_samples=2, ks=(1,)))


def test_load_examples_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n\n"
                    + json.dumps({"question": "r"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:3: field 'answer'"):
        runner.load_examples(path, prompt_field="question")
    path.write_text(json.dumps({"question": "q", "answer": "1", "task": "t"}) + "\n")
    (ex,) = runner.load_examples(path, prompt_field="question")
    assert ex == {"question": "q", "answer": "1", "task": "t", "prompt": "q"}


# ---- bookkeeping, with a scripted decoder ----------------------------------------------------------

EXAMPLES = [  # tasks, prompts of three lengths (three buckets), answers
    {"task": "add", "prompt": "12+34=?", "answer": "46"},
    {"task": "add", "prompt": "512+34=?", "answer": "546"},
    {"task": "sort", "prompt": "sort: 3 1 2 9 8 7", "answer": "1 2 3 7 8 9"},
    {"task": "sort", "prompt": "sort: 5 4", "answer": "4 5"},
    {"task": "word", "prompt": "ann has 2 bags of 3 figs, eats 1. how many?", "answer": "5"},
]


def _scripted_generate(correct_of, forwards_of):
    """A stand-in for decoder.generate_many: the text of row r is `#### <answer>` when
    correct_of(example, sample) else `#### wrong`, then <|im_end|>; row r reports
    forwards_of(example, sample) forwards and twice as many committed positions.
    The example is recovered from the prompt ids, the sample from the row's key.
    Rows are reported to the on_finish hook in reverse order, two at a time."""
    prompt_ids = runner.encode_prompts(TOK, [e["prompt"] for e in EXAMPLES], chat=True)
    calls = []

    def generate(params, config, prompt_tokens, prompt_lengths, rng, decode_config,
                 num_slots=None, hooks=decoder.Hooks()):
        prompt_tokens, prompt_lengths = np.asarray(prompt_tokens), np.asarray(prompt_lengths)
        calls.append(prompt_tokens.shape)
        batch, g = prompt_tokens.shape[0], decode_config.max_new_tokens
        tokens = np.full((batch, g), decoder.PAD_ID, np.int32)
        lengths, forwards = np.zeros(batch, np.int32), np.zeros(batch, np.int32)
        for r in range(batch):
            ids = prompt_tokens[r, :prompt_lengths[r]].tolist()
            e = prompt_ids.index(ids)
            # Independent of the runner's helper: the documented key derivation.
            s = next(s for s in range(8) if np.array_equal(
                jax.random.key_data(rng[r]),
                jax.random.key_data(jax.random.fold_in(jax.random.fold_in(jax.random.key(7), e), s))))
            text = f"#### {EXAMPLES[e]['answer'] if correct_of(e, s) else 'wrong'}"
            out = TOK.encode(text) + [TOK.token_to_id("<|im_end|>")]
            tokens[r, :len(out)] = out
            lengths[r], forwards[r] = len(out), forwards_of(e, s)
        if hooks.on_finish is not None:
            order = np.arange(batch)[::-1]
            for pair in range(0, batch, 2):
                items = order[pair:pair + 2]
                hooks.on_finish(items, np.ones(len(items), bool), tokens[items], lengths[items],
                                forwards[items], 2 * forwards[items])
        return DecodeResult(
            tokens=tokens, lengths=lengths, canvas=None, num_forwards=forwards,
            num_committed=2 * forwards, tokens_per_forward=np.full(batch, 2.0, np.float32),
            steps_per_block=None, batch_forwards=np.int32(forwards.max()))

    return generate, calls


def test_scoring_bookkeeping_matches_an_independent_count(monkeypatch):
    n = 4
    correct_of = lambda e, s: (e + s) % 3 == 0 or e == 4  # noqa: E731
    forwards_of = lambda e, s: 3 + e + s  # noqa: E731
    generate, calls = _scripted_generate(correct_of, forwards_of)
    monkeypatch.setattr(runner.decoder, "generate_many", generate)
    settings = runner.EvalSettings(n_samples=n, ks=(1, 2, 4), batch_size=6, num_buckets=3,
                                   seed=7, progress=False)
    dc = DecodeConfig(temperature=1.0, max_new_tokens=24, stop_ids=STOP)
    streamed = []
    result = runner.evaluate({}, get_preset("tiny"), TOK, EXAMPLES, dc, settings,
                             on_record=lambda e, record: streamed.append((e, record)))
    # Each record was handed out once, as its last sample finished, equal to the final one.
    assert sorted(e for e, _ in streamed) == list(range(len(EXAMPLES)))
    assert [e for e, _ in streamed] != list(range(len(EXAMPLES)))  # completion order
    for e, record in streamed:
        assert record == result.records[e]

    # Independent counts.
    c = [sum(correct_of(e, s) for s in range(n)) for e in range(len(EXAMPLES))]
    from math import comb
    for k in (1, 2, 4):
        expect = np.mean([1 - comb(n - ci, k) / comb(n, k) for ci in c])
        assert result.summary["pass_at_k"][str(k)] == pytest.approx(expect, abs=1e-12)
    assert result.summary["accuracy"] == pytest.approx(sum(c) / (n * len(EXAMPLES)))
    # Majority: a problem's vote is right iff more than half its samples are (the wrong
    # samples all say "wrong", one answer); ties go to the first sample's answer.
    maj = [ci > n - ci or (ci == n - ci and correct_of(e, 0)) for e, ci in enumerate(c)]
    assert result.summary["majority_accuracy"] == pytest.approx(np.mean(maj))
    total_f = sum(forwards_of(e, s) for e in range(len(EXAMPLES)) for s in range(n))
    assert result.summary["num_forwards"] == total_f
    assert result.summary["num_committed"] == 2 * total_f
    assert result.summary["tpf"] == pytest.approx(2.0)
    gen = sum(len(TOK.encode(f"#### {EXAMPLES[e]['answer'] if correct_of(e, s) else 'wrong'}")) + 1
              for e in range(len(EXAMPLES)) for s in range(n))
    assert result.summary["generated_tokens"] == gen
    by_task = result.summary["accuracy_by_task"]
    assert by_task["add"] == pytest.approx((c[0] + c[1]) / (2 * n))
    assert by_task["word"] == 1.0
    # Records: input order, one per example, samples in order, texts without the stop token.
    assert [r["prompt"] for r in result.records] == [e["prompt"] for e in EXAMPLES]
    for e, r in enumerate(result.records):
        assert r["num_correct"] == c[e]
        assert [s["correct"] for s in r["samples"]] == [correct_of(e, s) for s in range(n)]
        assert r["samples"][0]["text"].startswith("#### ") and "<|im_end|>" not in r["samples"][0]["text"]
        assert r["task"] == EXAMPLES[e]["task"]
    # One call per bucket, at most three, holding every row once.
    assert len(calls) <= 3
    assert sum(s[0] for s in calls) == n * len(EXAMPLES)
    json.dumps(result.summary)  # JSON-ready


# ---- end to end on a tiny random model ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    cfg = get_preset("tiny", vocab_size=104, num_layers=1, mask_token_id=4, eos_token_id=1,
                     bos_token_id=1)
    params = transformer.init_params(cfg, jax.random.key(0))
    # Sharpen the output distribution so that some positions clear the threshold.
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 30.0
    return cfg, params


def test_end_to_end_matches_one_unbucketed_batch(tiny_model):
    """Bucketed, batched evaluation decodes each row exactly as one plain decoder call on
    all prompts does (rows are independent in the decoder), and counts what it returns."""
    cfg, params = tiny_model
    examples = [e for e in tasks.load_split("test")][::67][:6]
    dc = DecodeConfig(mode="diffusion", block_length=4, steps=4, threshold=0.5,
                      max_new_tokens=8, stop_ids=STOP)
    settings = runner.EvalSettings(batch_size=4, num_buckets=2, progress=False)
    result = runner.evaluate(params, cfg, TOK, examples, dc, settings)

    ids = runner.encode_prompts(TOK, [e["prompt"] for e in examples], chat=True)
    width = max(map(len, ids))
    tokens = np.zeros((len(ids), width), np.int32)
    for i, x in enumerate(ids):
        tokens[i, :len(x)] = x
    ref = jax.device_get(decoder.generate(params, cfg, tokens, np.asarray([len(x) for x in ids]),
                                          jax.random.key(0), dc))
    committed = forwards = 0
    for i, r in enumerate(result.records):
        (s,) = r["samples"]
        out = ref.tokens[i, :ref.lengths[i]]
        assert s["text"] == TOK.decode([t for t in out if t < TOK.vocab_size], skip_special_tokens=True)
        assert s["num_tokens"] == int(ref.lengths[i])
        assert s["num_forwards"] == int(ref.num_forwards[i])
        assert s["num_committed"] == int(ref.num_committed[i])
        committed += int(ref.num_committed[i])
        forwards += int(ref.num_forwards[i])
    assert result.summary["tpf"] == pytest.approx(committed / forwards)
    assert result.summary["tpf"] > 1.0  # the threshold committed several positions per forward
    assert result.summary["accuracy"] == 0.0  # a random model
    assert result.summary["compile_seconds"] > 0.0
    assert result.summary["tokens_per_second"] > 0.0
    assert len(result.summary["bucket_lengths"]) == 2


def test_generate_texts_match_one_unbucketed_ar_batch(tiny_model):
    """Completions through buckets and continuous batching equal one plain AR decoder call
    on all prompts, cut at the first stop id, special tokens dropped."""
    cfg, params = tiny_model
    prompts = [e["prompt"] for e in tasks.load_split("test")][::97][:5]
    dc = DecodeConfig(mode="ar", max_new_tokens=6, stop_ids=STOP)
    settings = runner.EvalSettings(batch_size=2, num_buckets=2, progress=False)
    texts = runner.generate_texts(params, cfg, TOK, prompts, dc, settings)

    ids = runner.encode_prompts(TOK, prompts, chat=True)
    tokens = np.zeros((len(ids), max(map(len, ids))), np.int32)
    for i, x in enumerate(ids):
        tokens[i, :len(x)] = x
    ref = jax.device_get(decoder.generate(params, cfg, tokens, np.asarray([len(x) for x in ids]),
                                          jax.random.key(0), dc))
    expected = [TOK.decode([t for t in ref.tokens[i, :ref.lengths[i]]
                            if t < TOK.vocab_size and t not in STOP], skip_special_tokens=True)
                for i in range(len(prompts))]
    assert texts == expected
    assert any(texts)  # a random model still writes something
    with pytest.raises(ValueError, match="n_samples"):
        runner.generate_texts(params, cfg, TOK, prompts, dc,
                              runner.EvalSettings(n_samples=2, ks=(1,), progress=False))


@pytest.mark.parametrize("mode, block, expect", [("ar", 4, 100 - 13), ("diffusion", 8, 96 - 13),
                                                 ("diffusion", 4, 100 - 13)])
def test_prompt_capacity_is_the_longest_prompt_whose_canvas_fits(mode, block, expect):
    cfg = get_preset("tiny", max_position_embeddings=100)
    dc = DecodeConfig(mode=mode, block_length=block, steps=1, max_new_tokens=13)
    cap = runner.prompt_capacity(cfg, dc)
    assert cap == expect
    assert decoder.canvas_length(cap, dc) <= 100 < decoder.canvas_length(cap + 1, dc)


def test_too_long_prompts_are_refused_by_name():
    cfg = get_preset("tiny", vocab_size=104, max_position_embeddings=40, mask_token_id=4)
    examples = [{"prompt": "x", "answer": "1"}, {"prompt": "y" * 30, "answer": "2"}]
    with pytest.raises(ValueError, match=r"example 1 has a \d+-token prompt"):
        runner.evaluate({}, cfg, TOK, examples, DecodeConfig(max_new_tokens=8),
                        runner.EvalSettings(progress=False))
