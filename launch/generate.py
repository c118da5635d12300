"""Decode prompts with an sdar_jax params checkpoint (block diffusion or AR).

  python launch/generate.py --ckpt CKPT_DIR (--prompt TEXT | --prompts-file FILE.jsonl)
      [--tokenizer DIR] [--chat] [--output FILE.jsonl] [--mode diffusion|ar]
      [--block-length B] [--steps S] [--strategy NAME] [--threshold T] [--eb-bound E]
      [--said-stages K] [--said-rec-steps R] [--said-threshold T] [--chlg-threshold TAU]
      [--chlg-extra-steps N] [--temperature T] [--top-k K] [--top-p P]
      [--max-new-tokens G] [--stop-ids 151645,151643] [--batch-size N] [--seed S]
      [--mesh fsdp=4,tensor=2] [--stored-layout] [--compilation-cache DIR|off]

CKPT_DIR is what `launch/convert_checkpoint.py hf-to-jax` (or the trainer)
writes: `config.json` and `params/`, plus tokenizer files. A prompts file
holds one JSON object per line with `prompt` (text) or `prompt_ids` (a list
of token ids); each output line holds `index` (the prompt's line),
`completion`, `completion_ids`, `num_forwards` and `tokens_per_forward`.

All prompts decode in one jitted loop with continuous batching over
`--batch-size` slots: when a sequence finishes, the next prompt takes its
slot (no recompilation). Each result is appended to `--output` (flushed) as
soon as it is produced, so a failure later loses no finished work; at the
end the file is rewritten in input order. `--output` is checked for
writability before anything is loaded. A single prompt streams its text
block by block to stdout; every run ends with a summary line (TPF and
tokens/s). Compilations go to JAX's persistent cache (`--compilation-cache`),
so a second run on the same shapes compiles nothing (streaming and `--output`
included: they run between the decoder's chunks, not inside its programs).
Bad input exits with status 2 and a one-line message naming the value.

`--mesh fsdp=4,tensor=2` decodes on a device mesh (axes as in the train
config, `-1` for the devices left over), the params restored straight into
their shardings. On several hosts run the same command on every host
(multi-host start-up as `launch/train.py`); every process decodes every
prompt and process 0 streams, prints and writes the results.

The params are re-laid out once at load for decoding: the layers' stack
split into per-layer buffers (inside a scan XLA:CPU copies each layer's
weights before using them) and, when every forward multiplies few rows
(`--batch-size` x B at most 16) on CPU without `--mesh`, the large projection
kernels stored out-major (XLA:CPU multiplies a few rows by them 1.5-3x as
fast); `--stored-layout` decodes them as stored (docs/benchmarks.md has the
measurements).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from sdar_jax.cli import UsageError, load_inference_model, run_main
from sdar_jax.decode.cli import (
    DecodingArgsError, add_cache_args, add_decoding_args, add_mesh_args, check_writable,
    decode_config_from_args, enable_compilation_cache, few_rows_layout, resolve_stop_ids, start_run,
)

# Prompt buckets: a batch's prompts are right-padded to the next power of two
# (at least this), so one compilation serves many prompt lengths.
MIN_PROMPT_BUCKET = 16




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
    parser.add_argument("--batch-size", type=int, default=8,
                        help="batch rows (slots) of continuous batching")
    parser.add_argument("--seed", type=int, default=0)
    add_mesh_args(parser)
    add_cache_args(parser)
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
    """Prints a single sequence's new text after each block (a decoder hook)."""

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


class _Records:
    """Output records per prompt; `on_finish` (a decoder hook, run as sequences
    finish) appends each to the output stream as soon as it is produced."""

    def __init__(self, items, tokenizer, stop_ids, stream):
        self.items, self.tokenizer, self.stop_ids = items, tokenizer, set(stop_ids)
        self.stream = stream

    def record(self, index: int, ids: list[int], forwards: int, committed: int) -> dict[str, Any]:
        text_ids = ids[:-1] if ids and ids[-1] in self.stop_ids else ids
        return {
            "index": index,
            **self.items[index],
            "completion": self.tokenizer.decode(text_ids) if self.tokenizer is not None else None,
            "completion_ids": ids,
            "num_forwards": forwards,
            "tokens_per_forward": committed / max(forwards, 1),
        }

    def on_finish(self, indices, finished, tokens, lengths, forwards, committed) -> None:
        for slot in np.flatnonzero(np.asarray(finished)):
            ids = np.asarray(tokens[slot, : int(lengths[slot])]).tolist()
            self.stream.append(
                self.record(int(indices[slot]), ids, int(forwards[slot]), int(committed[slot])))


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        start_run(args)
    except DecodingArgsError as e:
        raise UsageError(str(e)) from e

    import jax
    import jax.numpy as jnp

    from sdar_jax.checkpoint import sharded_restore
    from sdar_jax.decode.decoder import Hooks, generate_many
    from sdar_jax.eval.runner import JsonlStream

    writer = sharded_restore.writes_outputs()
    try:
        if args.output and writer:
            check_writable(args.output, "--output")
        enable_compilation_cache(args)
    except DecodingArgsError as e:
        raise UsageError(str(e)) from e
    items = _read_prompts(args)
    model = load_inference_model(args.ckpt, args.mesh, args.stored_layout)
    config = model.config
    tokenizer = _load_tokenizer(args, needed=any("prompt" in item for item in items))
    prompts = _encode(items, tokenizer, args.chat, config.vocab_size)
    try:
        dc = decode_config_from_args(args, config, resolve_stop_ids(args, tokenizer, config))
    except DecodingArgsError as e:
        raise UsageError(str(e)) from e
    model = few_rows_layout(model, dc, min(args.batch_size, len(prompts)), args.stored_layout)
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
    # The hooks pause the decoding loop, whose programs hold collectives: every process must
    # pause at the same forwards, and only process 0 writes, so several processes run no hooks.
    in_loop = jax.process_count() == 1
    stream = None
    if len(prompts) == 1 and tokenizer is not None and args.output is None and writer and in_loop:
        stream = _Streamer(tokenizer, len(prompts[0]), dc.max_new_tokens, dc.stop_ids)

    width = min(_bucket(longest), max_prompt)
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, ids in enumerate(prompts):
        tokens[i, : len(ids)] = ids
    rng = jax.random.key(args.seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(len(prompts)))
    output = JsonlStream(args.output) if args.output and writer else None
    records = _Records(items, tokenizer, dc.stop_ids, output)
    start_time = time.perf_counter()
    with sharded_restore.activate(model.context):
        out = sharded_restore.to_host(generate_many(
            model.params, config, tokens, np.asarray([len(p) for p in prompts], np.int32),
            keys, dc, num_slots=args.batch_size,
            hooks=Hooks(stream=stream, on_finish=records.on_finish if output and in_loop else None),
        ))
    elapsed = time.perf_counter() - start_time
    if not writer:
        return 0
    results = [
        records.record(i, out.tokens[i, : int(out.lengths[i])].tolist(), int(out.num_forwards[i]),
                      int(out.num_committed[i]))
        for i in range(len(prompts))
    ]
    if output is not None:
        output.finish(results)
    elif stream is None:
        for result in results:
            print(result["completion"] if result["completion"] is not None else result["completion_ids"])
    else:
        print()
    total_tokens = int(np.asarray(out.lengths).sum())
    total_committed = int(np.asarray(out.num_committed).sum())
    total_forwards = int(np.asarray(out.num_forwards).sum())
    tpf = total_committed / max(total_forwards, 1)
    print(
        f"prompts={len(results)} tokens={total_tokens} forwards={total_forwards} TPF={tpf:.3f} "
        f"batch_forwards={int(out.batch_forwards)} tokens/s={total_tokens / elapsed:.1f} "
        f"(wall clock incl. compilation, {elapsed:.2f}s)",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("generate", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
