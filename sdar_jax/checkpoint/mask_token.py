"""Give an AR params checkpoint a mask token: one more vocabulary row, and the token in its tokenizer.

An AR model such as SmolLM2 has no `<|mask|>` for SDAR's block diffusion.
`add_mask_token` writes a copy of the checkpoint with

- one more row of the embedding table (and, for an untied head, one more
  column of `lm_head/kernel`), initialised to the mean of the others
  (`add_mean_row`); a tied head reads the new embedding row;
- the token registered in the copy's `tokenizer.json` (added tokens) and
  `tokenizer_config.json` (`added_tokens_decoder`, `mask_token`)
  (`register_token`);
- `vocab_size` + 1 and `mask_token_id` in its config.

An added row never collides with real data, while reusing a reserved token
would inherit its trained meaning and could occur in text.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from sdar_jax.checkpoint.atomic import AtomicDir
from sdar_jax.checkpoint.errors import ConversionError
from sdar_jax.checkpoint.params import load_params_checkpoint, save_params_checkpoint
from sdar_jax.data.tokenizer import load_tokenizer


def _mean_appended(table: np.ndarray, axis: int) -> np.ndarray:
    """`table` with its mean along `axis` (accumulated in float64) appended along `axis`."""
    mean = table.astype(np.float64).mean(axis, keepdims=True).astype(table.dtype)
    return np.concatenate([table, mean], axis)


def add_mean_row(params: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """The params (as numpy) with one vocabulary entry appended, set to the mean of the others.

    embed_tokens/embedding [vocab, hidden] -> [vocab + 1, hidden];
    lm_head/kernel [hidden, vocab] -> [hidden, vocab + 1] when the head is untied.

    Raises:
      ValueError: the embedding does not have `vocab_size` rows (or the head columns).
    """
    out = jax.tree.map(np.asarray, dict(params))
    table = out["embed_tokens"]["embedding"]
    if table.shape[0] != vocab_size:
        raise ValueError(f"embed_tokens/embedding has {table.shape[0]} rows; expected vocab_size "
                         f"{vocab_size}")
    out["embed_tokens"] = {"embedding": _mean_appended(table, 0)}
    if "lm_head" in out:
        kernel = out["lm_head"]["kernel"]
        if kernel.shape[1] != vocab_size:
            raise ValueError(f"lm_head/kernel has {kernel.shape[1]} columns; expected vocab_size "
                             f"{vocab_size}")
        out["lm_head"] = {"kernel": _mean_appended(kernel, 1)}
    return out


def _write_json(path: str, obj: Any, indent: int | None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)


def register_token(tokenizer_dir: str, token: str, token_id: int) -> None:
    """Adds `token` (special) as id `token_id` to `tokenizer_dir`'s tokenizer.json and
    tokenizer_config.json, and names it the `mask_token`. Edits the files in place.

    Raises:
      ConversionError: a file is missing, `token_id` is not the next free id, or `token` is
        already there.
    """
    tok_path = os.path.join(tokenizer_dir, "tokenizer.json")
    cfg_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    missing = [p for p in (tok_path, cfg_path) if not os.path.isfile(p)]
    if missing:
        raise ConversionError(f"{missing[0]}: no such file (a new token needs tokenizer.json and "
                              "tokenizer_config.json)")
    with open(tok_path, encoding="utf-8") as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    if token in vocab or any(t["content"] == token for t in tok["added_tokens"]):
        raise ConversionError(f"{tok_path}: already holds {token!r}")
    size = len(vocab) + sum(1 for t in tok["added_tokens"] if t["content"] not in vocab)
    if size != token_id:
        raise ConversionError(f"{tok_path}: the next free id is {size}, not {token_id}")
    entry = dict(content=token, single_word=False, lstrip=False, rstrip=False, normalized=False,
                 special=True)
    tok["added_tokens"].append({"id": token_id, **entry})
    _write_json(tok_path, tok, None)
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.setdefault("added_tokens_decoder", {})[str(token_id)] = entry
    cfg["mask_token"] = token
    _write_json(cfg_path, cfg, 2)


def add_mask_token(src_ckpt: str, out_dir: str, token: str, *, block_size: int | None = None,
                   overwrite: bool = False) -> str:
    """Writes `out_dir`: `src_ckpt` with `token` as a new last vocabulary id, the mask token.

    Args:
      src_ckpt: an AR params checkpoint with tokenizer files.
      out_dir: the new checkpoint (written whole or not at all).
      token: the mask token's text, e.g. "<|mask|>".
      block_size: written into the config (the SDAR block size), if given.
      overwrite: replace an existing `out_dir`.

    Returns:
      `out_dir`.

    Raises:
      ConversionError: bad source, tokenizer or output directory (naming it).
    """
    config, params = load_params_checkpoint(src_ckpt)
    mask_id = config.vocab_size
    extended = config.replace(vocab_size=mask_id + 1, mask_token_id=mask_id,
                              block_size=block_size if block_size is not None else config.block_size)
    try:
        params = add_mean_row(params, config.vocab_size)
    except ValueError as e:
        raise ConversionError(f"{src_ckpt}: {e}") from e
    with AtomicDir(out_dir, overwrite, sources=(src_ckpt,)) as tmp:
        save_params_checkpoint(tmp, extended, params, overwrite=True, aux_dir=src_ckpt)
        register_token(tmp, token, mask_id)
        if load_tokenizer(tmp).mask_token_id != mask_id:
            raise ConversionError(f"{src_ckpt}: the extended tokenizer does not resolve {token!r} "
                                  f"to {mask_id}")
    return out_dir
