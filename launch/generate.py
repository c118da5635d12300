"""Decode prompts with an sdar_jax params checkpoint (block diffusion or AR).

  python launch/generate.py --ckpt CKPT_DIR (--prompt TEXT | --prompts-file FILE.jsonl)
      [--tokenizer DIR] [--chat] [--output FILE.jsonl] [--mode diffusion|ar]
      [--block-length B] [--steps S] [--strategy NAME] [--threshold T] [--eb-bound E]
      [--said-stages K] [--said-rec-steps R] [--said-threshold T] [--chlg-threshold TAU]
      [--chlg-extra-steps N] [--temperature T] [--top-k K] [--top-p P]
      [--max-new-tokens G] [--stop-ids 151645,151643] [--batch-size N] [--seed S]

CKPT_DIR is what `launch/convert_checkpoint.py hf-to-jax` (or the trainer)
writes: `config.json` and `params/`, plus tokenizer files. A prompts file
holds one JSON object per line with `prompt` (text) or `prompt_ids` (a list
of token ids); each output line holds `completion`, `completion_ids`,
`num_forwards` and `tokens_per_forward`. A single prompt streams its text
block by block to stdout; every run ends with a summary line (TPF and
tokens/s). Bad input exits with status 2 and a one-line message naming the
value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from sdar_jax.decode.cli import (
    DecodingArgsError, add_decoding_args, decode_config_from_args, resolve_stop_ids,
)

# Prompt buckets: a batch's prompts are right-padded to the next power of two
# (at least this), so one compilation serves many prompt lengths.
MIN_PROMPT_BUCKET = 16


class UsageError(ValueError):
    """Bad command-line input; reported as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="params checkpoint directory")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the checkpoint directory)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (text)")
    source.add_argument("--prompts-file", help="JSONL file: {'prompt': text} or {'prompt_ids': [...]} per line")
    parser.add_argument("--chat", action="store_true",
                        help="wrap text prompts in the tokenizer's chat template (user turn)")
    parser.add_argument("--output", help="JSONL file to write one result per prompt")
    add_decoding_args(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _read_prompts(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.prompt is not None:
        return [{"prompt": args.prompt}]
    if not os.path.isfile(args.prompts_file):
        raise UsageError(f"--prompts-file {args.prompts_file!r}: no such file")
    items = []
    with open(args.prompts_file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{args.prompts_file}:{n}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: not valid JSON ({e})") from e
            if not isinstance(item, dict) or ("prompt" in item) == ("prompt_ids" in item):
                raise UsageError(f"{where}: expected an object with exactly one of 'prompt', 'prompt_ids'")
            if "prompt_ids" in item and not (
                isinstance(item["prompt_ids"], list)
                and all(isinstance(i, int) and not isinstance(i, bool) for i in item["prompt_ids"])
            ):
                raise UsageError(f"{where}: 'prompt_ids' must be a list of ints")
            if "prompt" in item and not isinstance(item["prompt"], str):
                raise UsageError(f"{where}: 'prompt' must be a string")
            items.append(item)
    if not items:
        raise UsageError(f"--prompts-file {args.prompts_file!r} holds no prompts")
    return items


def _load_tokenizer(args: argparse.Namespace, needed: bool):
    from sdar_jax.data.tokenizer import TokenizerError, load_tokenizer

    directory = args.tokenizer or args.ckpt
    try:
        return load_tokenizer(directory)
    except TokenizerError as e:
        if needed or args.tokenizer is not None:
            raise UsageError(f"tokenizer {directory!r}: {e}") from e
        return None


def _encode(items, tokenizer, chat: bool, vocab_size: int) -> list[list[int]]:
    encoded = []
    for n, item in enumerate(items, 1):
        if "prompt_ids" in item:
            ids = list(item["prompt_ids"])
        else:
            text = item["prompt"]
            if chat:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True
                )
            ids = tokenizer.encode(text)
        if not ids:
            raise UsageError(f"prompt {n} is empty (no tokens); an empty prompt cannot be decoded")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise UsageError(f"prompt {n}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        encoded.append(ids)
    return encoded


def _bucket(length: int) -> int:
    return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


class _Streamer:
    """Prints a single sequence's new text after each block (host callback)."""

    def __init__(self, tokenizer, prompt_length: int, max_new_tokens: int, stop_ids):
        self.tokenizer, self.prompt_length, self.max_new = tokenizer, prompt_length, max_new_tokens
        self.stop_ids = set(stop_ids)
        self.ids: list[int] = []
        self.printed = ""
        self.done = False

    def __call__(self, block_index, block, start, active) -> None:
        if self.done or not bool(active[0]):
            return
        for offset, token in enumerate(np.asarray(block[0]).tolist()):
            position = int(start[0]) + offset
            if position < self.prompt_length or len(self.ids) >= self.max_new:
                continue
            if token in self.stop_ids:
                self.done = True
                break
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from sdar_jax import convert
    from sdar_jax.decode.decoder import generate

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    items = _read_prompts(args)
    if not os.path.isdir(args.ckpt):
        raise UsageError(f"--ckpt {args.ckpt!r}: no such directory")
    try:
        config, params = convert.load_params_checkpoint(args.ckpt)
    except ValueError as e:
        raise UsageError(f"--ckpt {args.ckpt!r}: {e}") from e
    tokenizer = _load_tokenizer(args, needed=any("prompt" in item for item in items))
    prompts = _encode(items, tokenizer, args.chat, config.vocab_size)
    try:
        dc = decode_config_from_args(args, config, resolve_stop_ids(args, tokenizer, config))
    except DecodingArgsError as e:
        raise UsageError(str(e)) from e
    longest = max(map(len, prompts))
    positions = config.max_position_embeddings
    if dc.mode == "diffusion":  # the canvas is whole blocks
        positions = positions // dc.block_length * dc.block_length
    max_prompt = positions - dc.max_new_tokens
    if longest > max_prompt:
        raise UsageError(
            f"prompt length {longest} + --max-new-tokens {dc.max_new_tokens} needs more than the "
            f"model's {config.max_position_embeddings} positions (max_position_embeddings)"
        )
    stream = None
    if len(prompts) == 1 and tokenizer is not None and args.output is None:
        stream = _Streamer(tokenizer, len(prompts[0]), dc.max_new_tokens, dc.stop_ids)

    rng = jax.random.key(args.seed)
    results: list[dict[str, Any]] = []
    total_tokens = total_committed = total_forwards = 0
    start_time = time.perf_counter()
    for first in range(0, len(prompts), args.batch_size):
        chunk = prompts[first : first + args.batch_size]
        width = min(_bucket(max(map(len, chunk))), max_prompt)
        tokens = np.zeros((len(chunk), width), np.int32)
        for i, ids in enumerate(chunk):
            tokens[i, : len(ids)] = ids
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(first, first + len(chunk)))
        out = jax.device_get(generate(
            params, config, jnp.asarray(tokens), jnp.asarray([len(p) for p in chunk], jnp.int32),
            keys, dc, stream=stream,
        ))
        for i in range(len(chunk)):
            ids = out.tokens[i, : int(out.lengths[i])].tolist()
            text_ids = ids[:-1] if ids and ids[-1] in dc.stop_ids else ids
            results.append({
                **items[first + i],
                "completion": tokenizer.decode(text_ids) if tokenizer is not None else None,
                "completion_ids": ids,
                "num_forwards": int(out.num_forwards[i]),
                "tokens_per_forward": float(out.tokens_per_forward[i]),
            })
            total_tokens += len(ids)
            total_committed += int(out.num_committed[i])
            total_forwards += int(out.num_forwards[i])
    elapsed = time.perf_counter() - start_time

    if args.output:
        with open(args.output, "w") as f:
            for result in results:
                f.write(json.dumps(result) + "\n")
    elif stream is None:
        for result in results:
            print(result["completion"] if result["completion"] is not None else result["completion_ids"])
    else:
        print()
    tpf = total_committed / max(total_forwards, 1)
    print(
        f"prompts={len(results)} tokens={total_tokens} forwards={total_forwards} TPF={tpf:.3f} "
        f"tokens/s={total_tokens / elapsed:.1f} (wall clock incl. compilation, {elapsed:.2f}s)",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
