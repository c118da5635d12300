"""AR mode against transformers' greedy `generate` on a converted tiny Qwen3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdar_jax.convert.from_hf import hf_to_params
from sdar_jax.decode.decoder import DecodeConfig, generate
from tests.helpers import hf_models

MAX_NEW = 10
PROMPTS = [[7, 100, 3, 45, 300], [12], [400, 2, 9, 77, 31, 5, 250, 8]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    hf_dir, model = hf_models.make_checkpoint(
        tmp_path_factory.mktemp("qwen3") / "hf", "qwen3", num_hidden_layers=2, seed=3,
        rope_theta=1e6,
    )
    config, params = hf_to_params(hf_dir, "float32")
    return model, config, jax.tree.map(jnp.asarray, params)


def _hf_greedy(model, prompt, stop_id):
    model.generation_config.eos_token_id = stop_id
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, top_k=None,
            top_p=None, temperature=None,
        )
    return out[0, len(prompt):].tolist()


def _ours(config, params, stop_ids):
    width = max(map(len, PROMPTS))
    tokens = np.zeros((len(PROMPTS), width), np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p)] = p
    dc = DecodeConfig(mode="ar", max_new_tokens=MAX_NEW, stop_ids=stop_ids)
    lengths = jnp.asarray([len(p) for p in PROMPTS])
    return jax.device_get(generate(params, config, jnp.asarray(tokens), lengths, jax.random.key(0), dc))


def test_ar_matches_transformers_greedy_generate(converted):
    model, config, params = converted
    assert config.mask_token_id is None
    free = _ours(config, params, ())
    for r, prompt in enumerate(PROMPTS):
        assert free.tokens[r].tolist() == _hf_greedy(model, prompt, None), r
    assert free.num_forwards.tolist() == [MAX_NEW] * len(PROMPTS)
    np.testing.assert_allclose(free.tokens_per_forward, 1.0)

    stop = int(free.tokens[0, 4])
    stopped = _ours(config, params, (stop,))
    for r, prompt in enumerate(PROMPTS):
        n = int(stopped.lengths[r])
        hf = _hf_greedy(model, prompt, stop)
        hf = hf[: hf.index(stop) + 1] if stop in hf else hf
        assert stopped.tokens[r, :n].tolist() == hf, r
    assert int(stopped.lengths[0]) <= 5
    assert int(stopped.num_forwards[0]) == int(stopped.lengths[0])
