"""Decoding throughput: AR against SDAR block diffusion, measured side by side in one run.

  python bench/decode.py [--demo-dir DIR] [--batch-sizes 1,8,64,256] [--block-lengths 4,8]
      [--threshold 0.9] [--num-prompts N] [--prompt-length 32] [--max-new-tokens 128]
      [--schedules plain,continuous] [--fused-forwards when_needed,always] [--repeats 2]
      [--preset bench-100m|tiny|...] [--logit-scale S] [--dtype float32|bfloat16] [--small]
      [--stored-layout]

For every batch size, AR decoding and SDAR decoding (low_confidence_dynamic
at `--threshold`, steps = B) at each block length, from the same prompts,
under each schedule of the prompt list (when it holds more prompts than the
batch size; otherwise the two are the same and one row is printed):

  plain         consecutive batches of `batch` prompts, one decoder call each
                (a batch ends when its slowest row does)
  continuous    one `generate_many` call with `batch` slots: a finished row's
                slot takes the next prompt

  tokens/s      generated tokens (up to each row's stop id) / decode seconds,
                compilation excluded (best of `--repeats` timed runs)
  row TPF       committed positions / forwards, per row, averaged (spec §3.8)
  batch fwd     forwards the batch ran
  lock-step fwd the forwards of the same decoding with all rows moving to the
                next block together (sum over block index of the per-block
                maximum of the rows' steps; the decoder before per-row
                progress), same tokens
  queue fwd     the fewest batch forwards the schedule allows for these rows'
                forward counts (plain: the sum over batches of the slowest
                row's; continuous: the first-in-first-out queue's makespan,
                `perf.queue_forwards`); batch fwd above it is decoder overhead
  batch TPF     generated tokens / (batch forwards x batch)
  slot use      forwards the rows needed / (batch forwards x batch): the rest
                are forwards run for slots whose row had finished (or, in a
                batch's last chunk, that hold no prompt)
  vs AR         tokens/s ratio against the AR row of the same batch size and
                schedule

Models: random weights by default (a ~100M-parameter Qwen3-shaped SDAR
config; its confidences are low, so TPF stays near 1), or the demo's
trained models with `--demo-dir DIR` (the output directory of
`launch/demo.py`: demo_summary.json's `training.<stage>.export_dir`; `ar`
is the AR model, `sdar` the SDAR model (adapted at B=4, or with B drawn
from a set, as the demo's default recipe does), `sdar_b8` if present the one
adapted at B=8, else B=8 decodes the `sdar` model). The demo's held-out
problems are the prompts (chat template, the tokenizer's stop ids), and
`--num-prompts` defaults to all of them; with random weights it defaults
to the batch size. `--random-stop-ids K` makes K random vocabulary ids stop
ids, so that rows end at mixed lengths (nothing stops early otherwise).
`--logit-scale S` multiplies the random head's weights by S, to make the
random model more confident (on `tiny` at threshold 0.9 a factor of 20 left
the row TPF at 1.00).
`--fused-forwards` lists the layouts of the fused [previous ; block] forward
to compare (see `DecodeConfig.fused_forward`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdar_jax import perf
from sdar_jax.config import ModelConfig, get_preset
from sdar_jax.decode.decoder import DecodeConfig, generate_many
from sdar_jax.model import transformer

# ~100M parameters: 12 layers of width 768 (GQA 12/4 heads of 64), vocab 16384.
BENCH_100M = ModelConfig(
    model_type="sdar", vocab_size=16384, hidden_size=768, num_layers=12, num_heads=12,
    num_kv_heads=4, head_dim=64, intermediate_size=2048, max_position_embeddings=4096,
    block_size=4, mask_token_id=16383, bos_token_id=0, eos_token_id=1,
)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", default=None, help="launch/demo.py output directory")
    parser.add_argument("--preset", default="bench-100m",
                        help="random weights: bench-100m or a sdar_jax preset name")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 8, 64, 256])
    parser.add_argument("--block-lengths", type=_ints, default=[4, 8])
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="low_confidence_dynamic threshold of the SDAR rows")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="prompts per run (default: the batch size; with --demo-dir all "
                             "held-out problems)")
    parser.add_argument("--prompt-length", type=int, default=32, help="random prompts' length")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: 128, or the demo's max_new_tokens")
    parser.add_argument("--schedules", type=_names, default=["plain", "continuous"],
                        help="how a prompt list longer than the batch is decoded")
    parser.add_argument("--logit-scale", type=float, default=1.0,
                        help="random weights: multiply the head's weights by this")
    parser.add_argument("--random-stop-ids", type=int, default=0,
                        help="random weights: this many vocabulary ids (drawn with --seed) "
                             "act as stop ids, so rows end at mixed lengths")
    parser.add_argument("--fused-forwards", type=_names, default=["when_needed"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row (best is kept)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--small", action="store_true",
                        help="tiny preset, 32 new tokens, batch sizes 1,8: a quick check")
    parser.add_argument("--stored-layout", action="store_true",
                        help="decode with the layers as one scanned stack (the default splits "
                             "them into per-layer buffers, as generate and evaluate do)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _time(fn, repeats: int) -> tuple[float, Any]:
    out = jax.block_until_ready(fn())  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best, jax.device_get(out)


def _lock_step_forwards(steps_per_block: np.ndarray, slots: int) -> int:
    """Forwards of lock-step decoding (each block index run until its slowest row
    is done) of the same rows, `slots` at a time in input order."""
    total = 0
    for first in range(0, len(steps_per_block), slots):
        total += int(steps_per_block[first:first + slots].max(axis=0).sum())
    return total


def _decode(schedule: str, params, config, tokens, lengths, keys, dc, batch: int) -> dict:
    """Decodes every prompt under `schedule`; returns the results' arrays (host copies)
    and batch_forwards summed over the calls."""
    if schedule == "continuous":
        out = jax.device_get(generate_many(params, config, tokens, lengths, keys, dc,
                                           num_slots=batch))
        return dict(out._asdict())
    parts = [jax.device_get(generate_many(params, config, tokens[i:i + batch],
                                          lengths[i:i + batch], keys[i:i + batch], dc))
             for i in range(0, tokens.shape[0], batch)]
    out = {name: np.concatenate([getattr(p, name) for p in parts])
           for name in ("lengths", "num_forwards", "tokens_per_forward", "steps_per_block")}
    out["batch_forwards"] = sum(int(p.batch_forwards) for p in parts)
    return out


class _Models:
    """The models to decode with: AR and SDAR per block length, and the prompts."""

    def __init__(self, args: argparse.Namespace):
        self.stop_ids: tuple[int, ...] = ()
        if args.demo_dir is None:
            config = BENCH_100M if args.preset == "bench-100m" else get_preset(args.preset)
            config = config.replace(dtype=args.dtype, param_dtype=args.dtype)
            params = transformer.init_params(config, jax.random.key(args.seed))
            head = "embed_tokens" if config.tie_word_embeddings else "lm_head"
            leaf = "embedding" if config.tie_word_embeddings else "kernel"
            params[head][leaf] = params[head][leaf] * args.logit_scale
            if not args.stored_layout:
                params = transformer.unstack_layers(params, free_stacked=True)
            self.ar = self.sdar4 = self.sdar8 = (config, params)
            self.name = (f"random {args.preset} ({config.num_params / 1e6:.1f}M params, "
                         f"{args.dtype}, head x{args.logit_scale:g}, "
                         f"{args.random_stop_ids} random stop ids)")
            self.max_new = args.max_new_tokens or 128
            self.prompts = None
            draw = np.random.default_rng(args.seed + 1)
            self.stop_ids = tuple(sorted(draw.choice(np.arange(2, config.vocab_size - 1),
                                                     args.random_stop_ids, replace=False).tolist()))
            return
        from sdar_jax.checkpoint.params import load_params_checkpoint
        from sdar_jax.data import tasks
        from sdar_jax.data.tokenizer import load_tokenizer

        with open(os.path.join(args.demo_dir, "demo_summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        training = summary["training"]

        def load(stage):
            config, params = load_params_checkpoint(training[stage]["export_dir"], args.dtype)
            if not args.stored_layout:
                params = transformer.unstack_layers(params, free_stacked=True)
            return config, params

        self.ar, self.sdar4 = load("ar"), load("sdar")
        self.sdar8 = load("sdar_b8") if "sdar_b8" in training else self.sdar4
        tokenizer = load_tokenizer(training["sdar"]["export_dir"])
        self.stop_ids = tuple(tokenizer.stop_token_ids)
        test = tasks.load_split("test", tasks=summary.get("tasks"))
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": e["prompt"]}],
                                               add_generation_prompt=True) for e in test]
        self.prompts = [tokenizer.encode(t) for t in texts]
        self.max_new = args.max_new_tokens or summary["max_new_tokens"]
        mixed = summary.get("configs", {}).get("sdar", {}).get("objective", {}).get("mixed_block_sizes")
        b8_model = ("sdar_b8" if "sdar_b8" in training
                    else f"the sdar model (trained with B drawn from {mixed})" if mixed and 8 in mixed
                    else "the B=4 model")
        self.name = (f"demo models of {args.demo_dir} ({self.ar[0].num_params / 1e6:.1f}M params; "
                     f"B=8 rows: {b8_model})")

    def sdar(self, b: int):
        return self.sdar4 if b == 4 else self.sdar8


def run(args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    if args.small:
        args.preset, args.max_new_tokens, args.batch_sizes = "tiny", 32, [1, 8]
    models = _Models(args)
    runs = [("AR", models.ar, DecodeConfig(mode="ar", max_new_tokens=models.max_new,
                                           stop_ids=models.stop_ids))]
    for b in args.block_lengths:
        for layout in args.fused_forwards:
            name = f"SDAR B={b} dynamic {args.threshold}"
            if len(args.fused_forwards) > 1:
                name += f" fused={layout}"
            runs.append((name, models.sdar(b), DecodeConfig(
                block_length=b, steps=b, strategy="low_confidence_dynamic",
                threshold=args.threshold, max_new_tokens=models.max_new,
                stop_ids=models.stop_ids, fused_forward=layout)))
    rng = np.random.default_rng(args.seed)
    rows = []
    for batch in args.batch_sizes:
        if models.prompts is None:
            n = args.num_prompts or batch
            vocab = models.ar[0].vocab_size
            prompts = [rng.integers(2, vocab - 1, args.prompt_length).tolist() for _ in range(n)]
        else:
            n = args.num_prompts or len(models.prompts)
            prompts = [models.prompts[i % len(models.prompts)] for i in range(n)]
        width = max(map(len, prompts))
        tokens = np.zeros((n, width), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
        tokens = jnp.asarray(tokens)
        keys = jax.random.split(jax.random.key(0), n)
        schedules = args.schedules if n > batch else args.schedules[:1]
        for schedule in schedules:
            ar_rate = None
            for name, (config, params), dc in runs:
                cpu = time.process_time()
                seconds, out = _time(lambda: _decode(schedule, params, config, tokens, lengths,
                                                     keys, dc, batch), args.repeats)
                generated = int(out["lengths"].sum())
                rate = generated / seconds
                ar_rate = rate if dc.mode == "ar" else ar_rate
                batch_forwards = int(out["batch_forwards"])
                slots = min(batch, n)
                lock_step = (None if dc.mode == "ar"
                             else _lock_step_forwards(np.asarray(out["steps_per_block"]), batch))
                row_forwards = np.asarray(out["num_forwards"]).tolist()
                queue = (perf.queue_forwards(row_forwards, batch) if schedule == "continuous"
                         else sum(max(row_forwards[i:i + batch])
                                  for i in range(0, len(row_forwards), batch)))
                rows.append(dict(
                    batch=batch, prompts=n, schedule=schedule if n > batch else "-", run=name,
                    tokens_per_s=rate, row_tpf=float(out["tokens_per_forward"].mean()),
                    batch_forwards=batch_forwards, lock_step_forwards=lock_step,
                    queue_forwards=queue,
                    max_row_forwards=int(out["num_forwards"].max()),
                    batch_tpf=generated / (batch_forwards * slots),
                    slot_use=int(out["num_forwards"].sum()) / (batch_forwards * slots),
                    ratio=rate / ar_rate, cpu_seconds=time.process_time() - cpu))
    layout = "one scanned stack" if args.stored_layout else "per-layer buffers"
    return f"{models.name}, layers as {layout}", rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name, rows = run(args)
    print(f"# {name}, {rows[0]['prompts'] if rows else 0}+ prompts, device "
          f"{jax.devices()[0].device_kind}; tokens/s exclude compilation")
    print("| batch | prompts | schedule | run | tokens/s | row TPF | batch fwd | queue fwd | "
          "lock-step fwd | max row fwd | batch TPF | slot use | vs AR | CPU s (all runs of the row) |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lock = "" if r["lock_step_forwards"] is None else str(r["lock_step_forwards"])
        print(f"| {r['batch']} | {r['prompts']} | {r['schedule']} | {r['run']} | "
              f"{r['tokens_per_s']:.1f} | {r['row_tpf']:.2f} | {r['batch_forwards']} | "
              f"{r['queue_forwards']} | {lock} | "
              f"{r['max_row_forwards']} | {r['batch_tpf']:.2f} | {100 * r['slot_use']:.0f} % | "
              f"{r['ratio']:.2f}x | {r['cpu_seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
