"""Tokenizer loading, encoding, special ids and chat templates.

The SDAR tokenizer files are checked against `transformers`' Qwen2 tokenizer
loaded offline from the same directory (an independent implementation of the
files' semantics), and against strings written out by hand from the template.
"""

import filecmp
import json
import os
import shutil

import jinja2
import pytest

from sdar_jax.data import tasks
from sdar_jax.data.tokenizer import (CHAR_TOKENIZER_DIR, Tokenizer, TokenizerError,
                                     build_char_tokenizer, compile_chat_template,
                                     load_char_tokenizer)

from tests.helpers.shared import REFERENCE_DIR  # noqa: E402

SDAR_DIR = os.path.join(REFERENCE_DIR, "sdar-tokenizer")

TEXTS = [
    "Hello, world!",
    "naïve café, Grüße, 東京タワー, emoji 🙂 and ‘quotes’",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "3.14159 12345678901234567890 -42 1e-9 $1,234.56",
    "a   b\n\n\n   c \t\t d  \r\n  ",
    "I'm sure they'll say it's fine, we've seen THE'S and 'd",
    "\\frac{1}{2} + \\sqrt{x^2} = \\boxed{42}",
]


@pytest.fixture(scope="module")
def sdar() -> Tokenizer:
    return Tokenizer.from_dir(SDAR_DIR)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.Qwen2TokenizerFast.from_pretrained(SDAR_DIR, local_files_only=True)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(sdar, text):
    ids = sdar.encode(text)
    assert all(0 <= i < 151643 for i in ids), "plain text must not produce added tokens"
    assert sdar.decode(ids) == text


# Texts where the added-token precedence, byte fallback or splitting can go wrong.
HARD_TEXTS = [
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "x<|endoftext|>y<|MASK|>z<think>\nok\n</think>",
    "<MASK><MASK> masked <|MASK|>",
    "a<MASK>b <|MASK|><|MASK|>x <MASK",
    "<|im_end|><|im_end|> <tool_call>{\"a\": 1}</tool_call>",
    "emoji 👍🏽👨‍👩‍👧 ZWJ, flags 🇩🇪, CJK 你好世界, Arabic مرحبا, Devanagari नमस्ते",
    "for (int i = 0; i < n; ++i) { s += a[i] >> 2; }  // ok\n",
    "e\u0301 (decomposed) vs \u00e9, fullwidth ＡＢＣ, nbsp\u00a0x, \ufeffbom",
]


@pytest.mark.parametrize("text", TEXTS + HARD_TEXTS)
def test_encode_matches_transformers(sdar, hf, text):
    ids = sdar.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert sdar.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def hf_auto():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(SDAR_DIR, local_files_only=True)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_encode_matches_transformers_auto_tokenizer(sdar, hf_auto, text):
    assert sdar.encode(text) == hf_auto.encode(text, add_special_tokens=False)


def test_literal_mask_text_is_not_the_mask_token(sdar):
    # added_tokens.json says `<MASK>` for id 151669, tokenizer_config.json's
    # added_tokens_decoder says `<|MASK|>`: the decoder wins (as in transformers),
    # so user text cannot inject mask ids. Ids from transformers 5.23 on these files.
    assert sdar.encode("<MASK><MASK> masked <|MASK|>") == [33274, 7384, 1784, 49863, 29, 42148, 220, 151669]
    assert sdar.mask_token_id == 151669
    with pytest.raises(TokenizerError, match="<MASK>"):
        sdar.token_to_id("<MASK>")


def test_batch_encode_matches_single(sdar):
    assert sdar.encode_batch(TEXTS) == [sdar.encode(t) for t in TEXTS]


def test_special_token_ids(sdar):
    assert sdar.token_to_id("<|endoftext|>") == 151643
    assert sdar.token_to_id("<|im_start|>") == 151644
    assert sdar.token_to_id("<|im_end|>") == 151645
    assert sdar.token_to_id("<|MASK|>") == 151669
    assert sdar.eos_token_id == 151643
    assert sdar.pad_token_id == 151643
    assert sdar.bos_token_id is None
    assert sdar.mask_token_id == 151669
    assert sdar.stop_token_ids == (151645, 151643)
    assert sdar.vocab_size == 151670


def test_special_tokens_are_single_ids_inside_text(sdar):
    a, b = sdar.encode("a"), sdar.encode("b")
    assert sdar.encode("a<|endoftext|>b") == a + [151643] + b
    assert sdar.encode("a<|im_end|>b") == a + [151645] + b
    assert sdar.encode("a<|MASK|>b<|MASK|><|MASK|>") == a + [151669] + b + [151669, 151669]
    assert sdar.decode([151669]) == "<|MASK|>"


def test_unknown_token_and_bad_ids_are_named(sdar):
    with pytest.raises(TokenizerError, match="<nope>"):
        sdar.token_to_id("<nope>")
    with pytest.raises(TokenizerError, match="151670"):
        sdar.decode([1, 151670])


def test_chat_template_generation_prompt_exact(sdar):
    messages = [{"role": "user", "content": "What is 2+3?"}]
    assert sdar.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert sdar.apply_chat_template(messages) == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
    with_system = [{"role": "system", "content": "Be brief."}] + messages
    assert sdar.apply_chat_template(with_system, add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_chat_template_matches_transformers(sdar, hf):
    tools = [{"type": "function", "function": {"name": "add", "description": "x<y & z",
                                                "parameters": {"a": "int", "b": "int"}}}]
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "<think>\nplan\n</think>\n\nCalling.",
         "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "Thanks — and 4+4?"},
    ]
    for kwargs in ({}, {"tools": tools}, {"enable_thinking": False}):
        ours = sdar.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        ref = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        assert ours == ref
    assert '"description": "x<y & z"' in sdar.apply_chat_template(messages, tools=tools)


def test_template_raise_exception_and_sandbox():
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
        compile_chat_template("{{ raise_exception('bad role') }}").render()
    with pytest.raises(jinja2.exceptions.SecurityError):
        compile_chat_template("{{ messages.append(1) }}").render(messages=[])


def test_tokenizer_json_directory_loads_the_same(sdar, tmp_path):
    sdar.backend.save(str(tmp_path / "tokenizer.json"))
    for name in ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(SDAR_DIR, name), tmp_path / name)
    other = Tokenizer.from_dir(tmp_path)
    for text in TEXTS + ["a<MASK>b<|im_end|>"]:
        assert other.encode(text) == sdar.encode(text)
    assert other.chat_template == sdar.chat_template
    assert other.stop_token_ids == (other.eos_token_id, 151645)  # no generation_config.json here


def test_vocab_merges_with_legacy_added_tokens_only(tmp_path):
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        shutil.copy(os.path.join(SDAR_DIR, name), tmp_path / name)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == 151670
    assert tok.mask_token_id == 151669  # no config: falls back to `<MASK>`
    assert tok.encode("a<MASK>b") == tok.encode("a") + [151669] + tok.encode("b")
    assert tok.eos_token_id is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_tokenizer_json_is_named(tmp_path, damage):
    source = os.path.join(CHAR_TOKENIZER_DIR, "tokenizer.json")
    data = open(source, "rb").read()
    (tmp_path / "tokenizer.json").write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage")
    with pytest.raises(TokenizerError, match=f"{tmp_path}/tokenizer.json could not be read"):
        Tokenizer.from_dir(tmp_path)


def test_missing_files_name_directory_and_expected_files(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist.*tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "absent")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match=f"{tmp_path}.*merges.txt"):
        Tokenizer.from_dir(tmp_path)


def test_missing_named_special_token_is_rejected(tmp_path):
    build_char_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = "</s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="eos_token '</s>' is not in the vocabulary"):
        Tokenizer.from_dir(tmp_path)


def test_added_token_id_gap_is_rejected(tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(SDAR_DIR, name), tmp_path / name)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|endoftext|>": 151650}))
    with pytest.raises(TokenizerError, match="<\\|endoftext\\|>.*151650.*151643"):
        Tokenizer.from_dir(tmp_path)


# ---- the demo char tokenizer ------------------------------------------------------------

def test_shipped_char_tokenizer_equals_builder(tmp_path):
    build_char_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(tmp_path / name, os.path.join(CHAR_TOKENIZER_DIR, name), shallow=False), name


def test_char_tokenizer_ids_and_template():
    tok = load_char_tokenizer()
    assert tok.vocab_size == 103 < 128
    assert (tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 4)
    assert tok.stop_token_ids == (1, 3)
    prompt = tok.apply_chat_template([{"role": "user", "content": "12+5=?"}], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n12+5=?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt)
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(3) == 1
    assert len(ids) == 3 + len("user\n12+5=?\nassistant\n")
    assert tok.encode("a<MASK>b") == [tok.token_to_id("a"), 4, tok.token_to_id("b")]
    assert tok.encode("é") == [tok.token_to_id("<|unk|>")]


def test_char_tokenizer_round_trips_every_task_example():
    tok = load_char_tokenizer()
    examples = tasks.load_split("test")
    texts = [e["prompt"] + "\n" + e["response"] for e in examples]
    unk = tok.token_to_id("<|unk|>")
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert len(ids) == len(text) and unk not in ids
        assert tok.decode(ids) == text
