"""Teacher-forced token accuracy against a per-example, per-token loop on a tiny model."""

import jax
import numpy as np
import pytest

from sdar_jax.config import get_preset
from sdar_jax.data import tasks
from sdar_jax.data.tokenizer import CHAR_TOKENIZER_DIR, Tokenizer
from sdar_jax.eval import teacher_forcing as tf
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec

B = 4


@pytest.fixture(scope="module")
def setup():
    tokenizer = Tokenizer.from_dir(CHAR_TOKENIZER_DIR)
    examples = [e for t in ("add", "sort") for e in tasks.load_split("test", tasks=(t,))[:1]]
    examples.append(tasks.load_split("test", tasks=("word",))[0])
    return tokenizer, examples


def model(convention):
    config = get_preset("tiny", vocab_size=104, mask_token_id=4, num_layers=2,
                        logits_convention=convention)
    return config, transformer.init_params(config, jax.random.key(0))


def reference_hits(config, params, tokens, scored, probe):
    """One example at a time, one scored token at a time, the row built by hand."""
    L = len(tokens)
    hits = np.zeros(L, bool)
    positions = np.arange(L)[None]
    causal = jax.jit(lambda p, t: transformer.apply(
        config, p, t, positions, mask=MaskSpec("causal"), segment_ids=np.ones((1, L), np.int32)))
    diffusion = jax.jit(lambda p, t: transformer.apply(
        config, p, t, np.tile(positions, 2), mask=MaskSpec("block_diffusion", B),
        segment_ids=np.ones((1, 2 * L), np.int32)))
    for j in np.flatnonzero(scored):
        if probe == "next_token":
            if j == 0:
                continue
            logits = np.asarray(causal(params, tokens[None]).logits[0])
            hits[j] = logits[j - 1].argmax() == tokens[j]
            continue
        offset = np.arange(L) % B
        hide = scored if probe == "masked_block" else scored & (offset >= j % B)
        xt = np.where(hide, config.mask_token_id, tokens)
        logits = np.asarray(diffusion(params, np.concatenate([xt, tokens])[None]).logits[0])
        if config.logits_convention == "same_position":
            source = j
        else:
            source = j - 1 if j % B else L + j - 1
        hits[j] = logits[source].argmax() == tokens[j]
    return hits


@pytest.mark.parametrize("mode,convention", [("ar", "same_position"),
                                             ("diffusion", "same_position"),
                                             ("diffusion", "shifted")])
def test_hits_match_the_loop(setup, mode, convention):
    tokenizer, examples = setup
    config, params = model(convention)
    data = tf.encode(tokenizer, examples, B)
    hits = tf.count_hits(params, config, data, mode=mode, block_size=B, batch_size=2)
    assert set(hits) == set(tf.PROBES[mode])
    for probe, h in hits.items():
        assert h.shape == data.tokens.shape
        for i in range(len(examples)):
            np.testing.assert_array_equal(
                h[i], reference_hits(config, params, data.tokens[i], data.targets[i], probe),
                err_msg=f"{probe} example {i}")


def test_encoding_and_summary(setup):
    tokenizer, examples = setup
    data = tf.encode(tokenizer, examples, B)
    assert data.tokens.shape[1] % B == 0 and data.tasks == ("add", "sort", "word")
    for i, e in enumerate(examples):  # the scored tokens are the response and <|im_end|>
        scored = data.tokens[i][data.targets[i]]
        assert tokenizer.decode(scored[:-1].tolist()) == e["response"]
    hits = {"next_token": data.targets.copy()}
    hits["next_token"][0] = False  # example 0 all wrong
    summary = tf.summarize(hits, data, B)["next_token"]
    wrong = data.targets[0].sum()
    assert summary["all"]["tokens"] == data.targets.sum()
    np.testing.assert_allclose(summary["all"]["accuracy"], 1 - wrong / data.targets.sum())
    assert summary["by_task"]["sort"]["accuracy"] == 1.0
    assert summary["by_task"]["add"]["accuracy"] == 0.0
    assert sum(p["tokens"] for p in summary["by_position"]) == summary["all"]["tokens"]
    assert summary["first"]["tokens"] + summary["later"]["tokens"] == summary["all"]["tokens"]
    with pytest.raises(ValueError, match="mode"):
        tf.count_hits(None, get_preset("tiny"), data, mode="bidir", block_size=B)
    with pytest.raises(ValueError, match="multiple of 4"):
        tf.encode(tokenizer, examples, B, length=10)
