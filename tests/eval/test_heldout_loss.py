"""Held-out loss through the trainer's eval step: the AR loss equals a NumPy next-token
cross-entropy computed one example at a time; the SDAR loss is reproducible and scored at
the block size asked for, whatever the run config trains at."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from sdar_jax.config import get_preset
from sdar_jax.data import tasks
from sdar_jax.data.pipeline import RecordToExample
from sdar_jax.data.tokenizer import CHAR_TOKENIZER_DIR, Tokenizer
from sdar_jax.eval.heldout_loss import heldout_loss
from sdar_jax.model import transformer
from sdar_jax.ops.masks import MaskSpec
from sdar_jax.train.config import base_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = Tokenizer.from_dir(CHAR_TOKENIZER_DIR)
    examples = [{"prompt": e["prompt"], "response": e["response"]}
                for t in ("add", "sort", "word") for e in tasks.load_split("test", tasks=(t,))[:2]]
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    config = get_preset("tiny", vocab_size=104, num_layers=1, mask_token_id=4)
    params = transformer.init_params(config, jax.random.key(0))
    run = base_config()
    run.data.seq_len = 128  # rows pack about two examples
    run.data.global_batch_size = 2
    run.data.read_threads = 1
    run.objective.mixed_block_sizes = (4, 8)  # the trained sizes; the loss is asked at one
    return tokenizer, examples, str(path), config, params, run


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_ar_loss_matches_a_numpy_reference(setup):
    tokenizer, examples, path, config, params, run = setup
    to_example = RecordToExample(tokenizer)
    ce, hits = [], []
    for e in examples:
        ex = to_example.map(e)
        tokens = ex["tokens"][None]
        logits = np.asarray(transformer.apply(
            config, params, tokens, np.arange(tokens.shape[1])[None], mask=MaskSpec("causal"),
            segment_ids=np.ones_like(tokens)).logits[0], np.float64)
        logp = _log_softmax(logits)
        for j in np.flatnonzero(ex["loss_mask"]):
            ce.append(-logp[j - 1, tokens[0, j]])
            hits.append(logits[j - 1].argmax() == tokens[0, j])
    got = heldout_loss(params, config, tokenizer, path, run, kind="ar")
    assert got["loss"] == pytest.approx(np.mean(ce), rel=1e-4)
    assert got["accuracy"] == pytest.approx(np.mean(hits))


def test_sdar_loss_is_reproducible_and_at_the_asked_block(setup):
    tokenizer, _, path, config, params, run = setup
    b4 = heldout_loss(params, config, tokenizer, path, run, kind="sdar", block_size=4)
    assert np.isfinite(b4["loss"]) and b4["loss"] > 0
    assert heldout_loss(params, config, tokenizer, path, run, kind="sdar", block_size=4) == b4
    unmixed = run.copy_and_resolve_references()
    unmixed.objective.mixed_block_sizes = None
    assert heldout_loss(params, config, tokenizer, path, unmixed, kind="sdar", block_size=4) == b4
    b8 = heldout_loss(params, config, tokenizer, path, run, kind="sdar", block_size=8)
    assert b8["loss"] != b4["loss"]
    shifted = config.replace(logits_convention="shifted")
    assert heldout_loss(params, shifted, tokenizer, path, run, kind="sdar",
                        block_size=4)["loss"] != b4["loss"]


def test_sdar_loss_leaves_out_the_training_only_ar_term(setup):
    """A run config with the recipe's AR term scores the same SDAR loss: the held-out
    numbers of models trained with and without the term stay comparable."""
    tokenizer, _, path, config, params, run = setup
    causal = config.replace(logits_convention="shifted", block_attention="causal")
    plain = heldout_loss(params, causal, tokenizer, path, run, kind="sdar", block_size=4)
    with_ar_term = run.copy_and_resolve_references()
    with_ar_term.objective.ar_loss_weight = 1.0
    assert heldout_loss(params, causal, tokenizer, path, with_ar_term, kind="sdar",
                        block_size=4) == plain


def test_bad_kind_and_missing_mask_are_refused(setup):
    tokenizer, _, path, config, params, run = setup
    with pytest.raises(ValueError, match="kind 'mlm'"):
        heldout_loss(params, config, tokenizer, path, run, kind="mlm")
    with pytest.raises(ValueError, match="mask_token_id"):
        heldout_loss(params, config.replace(mask_token_id=None), tokenizer, path, run, kind="sdar",
                     block_size=4)
