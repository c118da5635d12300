"""Decoding throughput: AR against SDAR block diffusion, measured in one run.

  python bench/decode.py [--preset bench-100m|tiny|sdar-1.7b|...] [--batch-sizes 1,8,32]
      [--block-lengths 4,8] [--prompt-length 32] [--max-new-tokens 128] [--repeats 3]
      [--dtype float32|bfloat16] [--small]

Prints one table: for every batch size, AR decoding and SDAR decoding at each
block length, with wall-clock tokens/s (generated tokens over the decode time,
compilation excluded), tokens per forward (TPF, spec §3.8) and the speed ratio
against AR at the same batch size. The model is random (default: a ~100M
parameter Qwen3-shaped SDAR config), so its confidences are low and the
dynamic strategy commits about one token per step; each block length is
therefore also run with the static strategy at S = B / 2, whose TPF is 2 on
any model, to show what parallel commits buy on this hardware. `--small`
switches to the tiny preset and short generations for a quick check.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdar_jax.config import ModelConfig, get_preset
from sdar_jax.decode.decoder import DecodeConfig, generate
from sdar_jax.model import transformer

# ~100M parameters: 12 layers of width 768 (GQA 12/4 heads of 64), vocab 16384.
BENCH_100M = ModelConfig(
    model_type="sdar", vocab_size=16384, hidden_size=768, num_layers=12, num_heads=12,
    num_kv_heads=4, head_dim=64, intermediate_size=2048, max_position_embeddings=4096,
    block_size=4, mask_token_id=16383, bos_token_id=0, eos_token_id=1,
)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-100m", help="bench-100m or a sdar_jax preset name")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32])
    parser.add_argument("--block-lengths", type=_ints, default=[4, 8])
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="low_confidence_dynamic threshold of the SDAR rows")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (best is kept)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--small", action="store_true",
                        help="tiny preset, 32 new tokens, batch sizes 1,8: a quick check")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _time(fn, repeats: int) -> tuple[float, object]:
    out = jax.block_until_ready(fn())  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best, out


def run(args: argparse.Namespace) -> list[dict]:
    if args.small:
        args.preset, args.max_new_tokens, args.batch_sizes = "tiny", 32, [1, 8]
    config = BENCH_100M if args.preset == "bench-100m" else get_preset(args.preset)
    config = config.replace(dtype=args.dtype, param_dtype=args.dtype)
    params = transformer.init_params(config, jax.random.key(args.seed))
    runs = [("AR", DecodeConfig(mode="ar", max_new_tokens=args.max_new_tokens))]
    for b in args.block_lengths:
        runs.append((f"SDAR B={b} dynamic({args.threshold}) S={b}", DecodeConfig(
            block_length=b, steps=b, strategy="low_confidence_dynamic", threshold=args.threshold,
            max_new_tokens=args.max_new_tokens)))
        if b >= 2:
            runs.append((f"SDAR B={b} static S={b // 2}", DecodeConfig(
                block_length=b, steps=b // 2, strategy="low_confidence_static",
                max_new_tokens=args.max_new_tokens)))
    rows = []
    rng = np.random.default_rng(args.seed)
    for batch in args.batch_sizes:
        prompts = jnp.asarray(
            rng.integers(2, config.vocab_size - 1, (batch, args.prompt_length)), jnp.int32
        )
        lengths = jnp.full((batch,), args.prompt_length, jnp.int32)
        ar_rate = None
        for name, dc in runs:
            seconds, out = _time(
                lambda: generate(params, config, prompts, lengths, jax.random.key(0), dc),
                args.repeats,
            )
            tokens = int(np.asarray(out.lengths).sum())
            rate = tokens / seconds
            ar_rate = rate if dc.mode == "ar" else ar_rate
            rows.append(dict(batch=batch, run=name, tokens_per_s=rate,
                             tpf=float(np.asarray(out.tokens_per_forward).mean()),
                             ratio=rate / ar_rate))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = run(args)
    config = BENCH_100M if args.preset == "bench-100m" else get_preset(args.preset)
    print(f"# {args.preset} ({config.num_params / 1e6:.1f}M params, {args.dtype}), "
          f"prompt {args.prompt_length}, {args.max_new_tokens} new tokens, "
          f"device {jax.devices()[0].device_kind}")
    print(f"| batch | run | tokens/s | TPF | vs AR |")
    print(f"|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['run']} | {r['tokens_per_s']:.1f} | {r['tpf']:.2f} | "
              f"{r['ratio']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
