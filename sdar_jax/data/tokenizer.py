"""Tokenizer loading (Hugging Face `tokenizers`) and chat-template rendering (jinja2).

A tokenizer directory holds either a `tokenizer.json`, or the Qwen2 byte-level
BPE files `vocab.json` + `merges.txt`. Added tokens come from
`tokenizer_config.json`'s `added_tokens_decoder` and/or `added_tokens.json`;
special-token names (eos, pad, bos, unk, mask) from `tokenizer_config.json`,
else `special_tokens_map.json`; the chat template from `chat_template.jinja`,
else `tokenizer_config.json`'s `chat_template`; stop ids from
`generation_config.json`'s `eos_token_id` when present.

Precedence follows `transformers` so that encodings agree with it: when
`tokenizer_config.json` has `added_tokens_decoder`, that list is authoritative
and `added_tokens.json` only contributes strings at ids the decoder leaves
free. The released SDAR files name id 151669 `<MASK>` in `added_tokens.json`
and `<|MASK|>` in the decoder: only `<|MASK|>` is the mask token, and the
literal text `<MASK>` encodes as plain text (user text cannot inject mask ids).

`build_char_tokenizer` writes the tiny char-level tokenizer of the embedded
demo (`assets/char_tokenizer`, rebuilt by `python -m sdar_jax.data.tokenizer`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

# Qwen2's pre-tokenizer split (as written into Qwen2's tokenizer.json).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
_EXPECTED_FILES = "tokenizer.json, or vocab.json + merges.txt"


class TokenizerError(ValueError):
    """A tokenizer file is missing or inconsistent, or a token is unknown."""


@dataclasses.dataclass(frozen=True)
class _AddedToken:
    id: int
    content: str
    special: bool
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e


def _token_content(value: Any) -> str | None:
    """A special-token field is a string, an AddedToken-like dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"expected a token string or {{'content': ...}} dict, got {value!r}")


def _special_token_names(config: Mapping[str, Any], special_map: Mapping[str, Any]) -> dict[str, str]:
    """Field name (eos_token, ...) -> token string; tokenizer_config wins over special_tokens_map."""
    names = {}
    for field in _SPECIAL_TOKEN_FIELDS:
        value = config[field] if field in config else special_map.get(field)
        content = _token_content(value)
        if content is not None:
            names[field] = content
    return names


def _additional_special(config: Mapping[str, Any], special_map: Mapping[str, Any]) -> list[str]:
    key = "additional_special_tokens"
    values = config[key] if key in config else special_map.get(key, [])
    return [c for c in (_token_content(v) for v in values or []) if c is not None]


def _added_tokens(
    directory: str, config: Mapping[str, Any], special_names: set[str]
) -> list[_AddedToken]:
    """Added tokens (sorted by id) from the config files.

    `added_tokens_decoder` wins; an `added_tokens.json` entry is used only for
    an id the decoder does not define (a different string at a decoder id is
    dropped, as `transformers` does).
    """
    legacy_path = os.path.join(directory, "added_tokens.json")
    legacy = _read_json(legacy_path) if os.path.exists(legacy_path) else {}
    decoder = config.get("added_tokens_decoder")
    if decoder:
        entries = []
        for key, spec in decoder.items():
            if not isinstance(spec, dict) or "content" not in spec:
                raise TokenizerError(
                    f"{directory}/tokenizer_config.json: added_tokens_decoder[{key!r}] must be "
                    f"a dict with 'content', got {spec!r}")
            content = spec["content"]
            entries.append(_AddedToken(
                id=int(key), content=content,
                special=bool(spec.get("special", False)) or content in special_names,
                lstrip=bool(spec.get("lstrip", False)), rstrip=bool(spec.get("rstrip", False)),
                single_word=bool(spec.get("single_word", False)),
                normalized=bool(spec.get("normalized", not spec.get("special", False)))))
        defined = {e.id for e in entries} | {e.content for e in entries}
        entries += [_AddedToken(id=int(idx), content=content, special=content in special_names)
                    for content, idx in legacy.items()
                    if int(idx) not in defined and content not in defined]
    else:
        entries = [_AddedToken(id=int(idx), content=content, special=content in special_names)
                   for content, idx in legacy.items()]
    return sorted(entries, key=lambda e: e.id)


def _qwen2_bpe(vocab_path: str, merges_path: str) -> tokenizers.Tokenizer:
    """Qwen2 byte-level BPE: NFC, the Qwen2 regex split, ByteLevel bytes-to-unicode."""
    backend = tokenizers.Tokenizer(models.BPE.from_file(vocab_path, merges_path))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _register(backend: tokenizers.Tokenizer, entries: Sequence[_AddedToken], directory: str) -> None:
    """Adds each token at the id the files give it; a token already present must match."""
    for entry in entries:
        existing = backend.token_to_id(entry.content)
        if existing is not None:
            if existing != entry.id:
                raise TokenizerError(
                    f"{directory}: added token {entry.content!r} has id {entry.id} in the config "
                    f"but id {existing} in the vocabulary")
            continue
        next_id = backend.get_vocab_size(with_added_tokens=True)
        if entry.id != next_id:
            raise TokenizerError(
                f"{directory}: added token {entry.content!r} has id {entry.id}, but the next free id "
                f"is {next_id}; added-token ids must continue the vocabulary without gaps")
        backend.add_tokens([tokenizers.AddedToken(
            entry.content, single_word=entry.single_word, lstrip=entry.lstrip,
            rstrip=entry.rstrip, normalized=entry.normalized, special=entry.special)])


def _load_backend(load: Callable[[], tokenizers.Tokenizer], what: str) -> tokenizers.Tokenizer:
    """`load()`, with the Rust backend's parse error turned into one naming `what`."""
    try:
        return load()
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        if isinstance(e, (OSError, MemoryError)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"{what} could not be read as a tokenizer (truncated or corrupt?): {first}") from e


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compiles a chat template the way `transformers` does.

    Sandboxed (immutable) environment, `trim_blocks` and `lstrip_blocks`, the
    `loopcontrols` extension, a `tojson` filter that does not HTML-escape, and a
    `raise_exception(message)` global.
    """
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


def _chat_template_source(directory: str, config: Mapping[str, Any]) -> str | None:
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    # A list of named templates: [{"name": "default", "template": "..."}, ...].
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if "default" not in named:
        raise TokenizerError(
            f"{directory}/tokenizer_config.json: chat_template list has no 'default' entry "
            f"(names: {sorted(map(str, named))})")
    return named["default"]


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """A loaded tokenizer: encoding, decoding, special ids and the chat template.

    Build it with `Tokenizer.from_dir(path)`. `vocab_size` counts the base
    vocabulary plus added tokens (151670 for SDAR/Qwen3); model embedding
    tables are usually padded beyond it (151936).
    """

    backend: tokenizers.Tokenizer
    directory: str
    special_tokens: Mapping[str, str]  # "eos_token" -> "<|endoftext|>", ...
    chat_template: str | None
    generation_eos_ids: tuple[int, ...] = ()
    _template: jinja2.Template | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> "Tokenizer":
        """Loads `directory` (see the module docstring for the files read)."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise TokenizerError(f"tokenizer directory {directory!r} does not exist; "
                                 f"expected a directory with {_EXPECTED_FILES}")

        def path(name: str) -> str:
            return os.path.join(directory, name)

        def optional_json(name: str) -> dict[str, Any]:
            return _read_json(path(name)) if os.path.exists(path(name)) else {}

        if os.path.exists(path("tokenizer.json")):
            backend = _load_backend(lambda: tokenizers.Tokenizer.from_file(path("tokenizer.json")),
                                    path("tokenizer.json"))
        elif os.path.exists(path("vocab.json")) and os.path.exists(path("merges.txt")):
            backend = _load_backend(lambda: _qwen2_bpe(path("vocab.json"), path("merges.txt")),
                                    f"{path('vocab.json')} + merges.txt")
        else:
            raise TokenizerError(f"tokenizer directory {directory!r} has {sorted(os.listdir(directory))}; "
                                 f"expected {_EXPECTED_FILES}")
        config = optional_json("tokenizer_config.json")
        special_map = optional_json("special_tokens_map.json")
        special_tokens = _special_token_names(config, special_map)
        special_names = set(special_tokens.values()) | set(_additional_special(config, special_map))
        entries = _added_tokens(directory, config, special_names)
        _register(backend, entries, directory)

        eos_ids = optional_json("generation_config.json").get("eos_token_id", ())
        eos_ids = (eos_ids,) if isinstance(eos_ids, int) else tuple(int(i) for i in eos_ids)
        template = _chat_template_source(directory, config)
        tok = cls(backend=backend, directory=directory, special_tokens=special_tokens,
                  chat_template=template, generation_eos_ids=eos_ids,
                  _template=compile_chat_template(template) if template else None)
        for field, content in special_tokens.items():
            if tok.backend.token_to_id(content) is None:
                raise TokenizerError(f"{directory}: {field} {content!r} is not in the vocabulary")
        return tok

    # ---- vocabulary ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus added tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """The id of one token string; raises naming it if unknown."""
        idx = self.backend.token_to_id(token)
        if idx is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary of {self.directory!r}")
        return idx

    def id_to_token(self, idx: int) -> str:
        token = self.backend.id_to_token(idx)
        if token is None:
            raise TokenizerError(f"id {idx} is outside the vocabulary of {self.directory!r} "
                                 f"(size {self.vocab_size})")
        return token

    def _special_id(self, field: str) -> int | None:
        content = self.special_tokens.get(field)
        return None if content is None else self.token_to_id(content)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def mask_token_id(self) -> int | None:
        """The configured `mask_token`, else `<MASK>` if the vocabulary has it, else None."""
        named = self._special_id("mask_token")
        if named is not None:
            return named
        try:
            return self.token_to_id("<MASK>")
        except TokenizerError:
            return None

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: generation_config's eos ids, else eos and `<|im_end|>`."""
        if self.generation_eos_ids:
            return self.generation_eos_ids
        ids = [i for i in (self.eos_token_id,) if i is not None]
        im_end = self.backend.token_to_id("<|im_end|>")
        if im_end is not None and im_end not in ids:
            ids.append(im_end)
        return tuple(ids)

    # ---- text <-> ids --------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added tokens inside the text become single ids, none are added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; with `skip_special_tokens`, tokens marked special are dropped."""
        ids = [int(i) for i in ids]
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise TokenizerError(f"ids {bad[:8]} are outside the vocabulary of {self.directory!r} "
                                 f"(size {size})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """Renders `messages` ([{"role": ..., "content": ...}, ...]) with the chat template.

        The special-token strings (`eos_token`, `pad_token`, ...) are visible to
        the template, as in `transformers`; `kwargs` (e.g. `tools`,
        `enable_thinking`) are passed through and override them.
        """
        if self._template is None:
            raise TokenizerError(f"{self.directory!r} has no chat template (looked for "
                                 f"chat_template.jinja and tokenizer_config.json's chat_template)")
        context = {**self.special_tokens, **kwargs}
        return self._template.render(messages=[dict(m) for m in messages],
                                     add_generation_prompt=add_generation_prompt, **context)


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """Same as `Tokenizer.from_dir`."""
    return Tokenizer.from_dir(directory)


# ---- the char-level tokenizer of the embedded demo ------------------------------------

CHAR_TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "assets", "char_tokenizer")
# Specials first, so their ids are small and stable: pad 0, eos 1, ..., unk 5.
CHAR_SPECIAL_TOKENS = ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<MASK>", "<|unk|>")
# Newline, tab and printable ASCII (space to '~'): 97 characters.
CHAR_ALPHABET = "\n\t" + "".join(chr(c) for c in range(0x20, 0x7F))
CHAR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_char_tokenizer(out_dir: str | os.PathLike[str]) -> None:
    """Writes the demo's char-level tokenizer (`tokenizer.json`, `tokenizer_config.json`).

    One token per character of `CHAR_ALPHABET` (a WordLevel model over a
    split into single characters, joined back by a Fuse decoder), after the
    special tokens `CHAR_SPECIAL_TOKENS` (ids 0..5); 103 ids in all. Any other
    character encodes as `<|unk|>`. The chat template is the Qwen
    `<|im_start|>role\\ncontent<|im_end|>\\n` layout without system/tool logic.
    `Tokenizer.from_dir(out_dir)` (and `transformers`' fast tokenizer) load it.
    """
    out_dir = os.fspath(out_dir)
    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIAL_TOKENS + tuple(CHAR_ALPHABET))}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True)
                                for t in CHAR_SPECIAL_TOKENS])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "unk_token": "<|unk|>",
        "mask_token": "<MASK>",
        "model_max_length": 4096,
        "added_tokens_decoder": {
            str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
            for t in CHAR_SPECIAL_TOKENS},
        "chat_template": CHAR_CHAT_TEMPLATE,
    }
    os.makedirs(out_dir, exist_ok=True)
    backend.save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def load_char_tokenizer() -> Tokenizer:
    """The shipped demo tokenizer (`assets/char_tokenizer`)."""
    return Tokenizer.from_dir(CHAR_TOKENIZER_DIR)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the demo's char-level tokenizer.")
    parser.add_argument("--out", default=CHAR_TOKENIZER_DIR, help="output directory")
    build_char_tokenizer(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
