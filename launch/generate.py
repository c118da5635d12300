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

from sdar_jax.decode import strategies
from sdar_jax.decode.decoder import DecodeConfig

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
    parser.add_argument("--mode", choices=("diffusion", "ar"), default=None,
                        help="diffusion (SDAR) or ar (plain AR); default: diffusion when the "
                             "config has a mask token, else ar")
    d = DecodeConfig()
    parser.add_argument("--block-length", type=int, default=None,
                        help="block length B (default: the config's block_size, else 4)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps per block (default: B); for said/said_chlg the "
                             "per-block step budget")
    parser.add_argument("--strategy", default=d.strategy,
                        help=f"remasking strategy, one of {', '.join(strategies.STRATEGY_NAMES)}")
    parser.add_argument("--threshold", type=float, default=d.threshold,
                        help="confidence threshold of low_confidence_dynamic, in (0, 1]")
    parser.add_argument("--eb-bound", type=float, default=d.eb_bound,
                        help="entropy bound of entropy_bounded (nats)")
    parser.add_argument("--said-stages", type=int, default=d.said_stages, help="SAID stages K")
    parser.add_argument("--said-rec-steps", type=int, default=d.said_rec_steps,
                        help="steps of SAID's reconstruction stage")
    parser.add_argument("--said-threshold", type=float, default=None,
                        help="dynamic confidence threshold inside SAID stages (default: static)")
    parser.add_argument("--chlg-threshold", type=float, default=d.chlg_threshold,
                        help="CHLG threshold tau (said_chlg)")
    parser.add_argument("--chlg-extra-steps", type=int, default=d.chlg_extra_steps,
                        help="CHLG extra steps for positions below tau (said_chlg)")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="1 = off")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--stop-ids", default=None,
                        help="comma-separated stop token ids (default: the tokenizer's stop ids, "
                             "else the config's eos)")
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


def _stop_ids(args, tokenizer, config) -> tuple[int, ...]:
    if args.stop_ids is not None:
        try:
            return tuple(int(s) for s in args.stop_ids.split(",") if s.strip())
        except ValueError as e:
            raise UsageError(f"--stop-ids {args.stop_ids!r}: expected comma-separated ints") from e
    if tokenizer is not None and tokenizer.stop_token_ids:
        return tuple(tokenizer.stop_token_ids)
    return () if config.eos_token_id is None else (config.eos_token_id,)


def _decode_config(args, config, stop_ids) -> DecodeConfig:
    mode = args.mode or ("diffusion" if config.is_diffusion else "ar")
    if mode == "diffusion" and not config.is_diffusion:
        raise UsageError(
            f"--mode diffusion needs a checkpoint with a mask token; {args.ckpt}/config.json has no "
            "mask_token_id (a plain AR model: use --mode ar)"
        )
    if args.strategy not in strategies.STRATEGY_NAMES:
        raise UsageError(
            f"--strategy {args.strategy!r} is unknown; valid: {', '.join(strategies.STRATEGY_NAMES)}"
        )
    if not 0.0 < args.threshold <= 1.0:
        raise UsageError(f"--threshold {args.threshold} is outside (0, 1]")
    block_length = args.block_length or config.block_size or 4
    try:
        return DecodeConfig(
            mode=mode, block_length=block_length,
            steps=args.steps if args.steps is not None else block_length,
            strategy=args.strategy, threshold=args.threshold, eb_bound=args.eb_bound,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, stop_ids=stop_ids, said_stages=args.said_stages,
            said_rec_steps=args.said_rec_steps, said_threshold=args.said_threshold,
            chlg_threshold=args.chlg_threshold, chlg_extra_steps=args.chlg_extra_steps,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e


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
    dc = _decode_config(args, config, _stop_ids(args, tokenizer, config))
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
