"""Block-diffusion attention: the Pallas kernel against XLA, side by side in one run.

Compares, forward and forward+backward, on the same inputs and mask:
  pallas   sdar_jax's block-sparse kernel (impl "pallas"),
  xla      sdar_jax's XLA reference (impl "xla": dense mask, einsum, float32 softmax),
  jax.nn   jax.nn.dot_product_attention with the dense boolean mask.
Time is the median over repeats; TFLOP/s counts only unmasked work
(4 * head_dim * heads per allowed (query, key) pair forward, 2.5x that backward).

Accelerator:   python bench/attention.py --seq 2048 4096 8192
CPU smoke run: python bench/attention.py --interpret --seq 128 --heads 4 --kv-heads 2 --head-dim 64
Decode step:   python bench/attention.py --decode --batch 8 --seq 4096 16384
(--seq is the example length L; block_diffusion attends over the 2L row [xt; x0].)
"""

from __future__ import annotations

import argparse
import datetime
import subprocess

import jax
import jax.numpy as jnp

from sdar_jax import perf
from sdar_jax.ops import attention, masks, platform
from sdar_jax.ops.xla_attention import xla_attention


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _inputs(args, length: int):
    """q, k, v, dout and the mask for one row length."""
    spec = masks.MaskSpec(args.mask, args.block_size)
    row = 2 * length if args.mask == "block_diffusion" else length
    segment_len = length // args.segments
    positions = jnp.arange(length, dtype=jnp.int32) % segment_len
    segments = jnp.minimum(jnp.arange(length, dtype=jnp.int32) // segment_len, args.segments - 1) + 1
    if args.mask == "block_diffusion":
        positions, segments = jnp.tile(positions, 2), jnp.tile(segments, 2)
    positions = jnp.broadcast_to(positions, (args.batch, row))
    segments = jnp.broadcast_to(segments, (args.batch, row))
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (args.batch, row, args.heads, args.head_dim), dtype)
    k = jax.random.normal(keys[1], (args.batch, row, args.kv_heads, args.head_dim), dtype)
    v = jax.random.normal(keys[2], (args.batch, row, args.kv_heads, args.head_dim), dtype)
    dout = jax.random.normal(keys[3], q.shape, dtype)
    return q, k, v, dout, masks.AttentionMask.self_attention(spec, positions, segments)


def _methods(args, mask: masks.AttentionMask):
    def pallas(q, k, v):
        return attention.attention(q, k, v, mask, impl="pallas", backend=args.backend,
                                   interpret=args.interpret or None)

    def xla(q, k, v):
        return xla_attention(q, k, v, mask)

    dense = mask.dense()

    def nn_dpa(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=dense[:, None])

    return {"pallas": pallas, "xla": xla, "jax.nn": nn_dpa}, dense


def _decode(args) -> None:
    """One decoding step: B queries per row against a cache of max_len = --seq, rows at
    ragged positions (visible prefixes spread uniformly); forward only. GB/s counts the
    K/V bytes of each row's visible prefix, the traffic a perfect kernel cannot avoid."""
    print(f"{'cache':>6} {'method':>7} {'ms':>9} {'GB/s':>8} {'x':>6}")
    dtype = jnp.dtype(args.dtype)
    for max_len in args.seq:
        block = args.block_size
        starts = (jnp.arange(args.batch) * (max_len // block) // max(args.batch, 1)) * block
        starts = starts.at[-1].set(max_len - block)
        q_pos = (starts[:, None] + jnp.arange(block)[None]).astype(jnp.int32)
        kv_pos = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (args.batch, max_len))
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        q = jax.random.normal(keys[0], (args.batch, block, args.heads, args.head_dim), dtype)
        k = jax.random.normal(keys[1], (args.batch, max_len, args.kv_heads, args.head_dim), dtype)
        v = jax.random.normal(keys[2], k.shape, dtype)
        mask = masks.AttentionMask(masks.block_causal(block), q_pos, kv_pos)
        visible_bytes = 2 * float((starts + block).sum()) * args.kv_heads * args.head_dim * dtype.itemsize
        methods = {
            "pallas": lambda q, k, v: attention.attention(
                q, k, v, mask, impl="pallas", backend=args.backend, interpret=args.interpret or None),
            "xla": lambda q, k, v: xla_attention(q, k, v, mask),
        }
        times = {name: perf.median_seconds(jax.jit(fn), q, k, v, repeats=args.repeats)
                 for name, fn in methods.items() if name not in args.skip}
        for name, t in times.items():
            ratio = f"{times['xla'] / t:6.2f}" if "xla" in times else "     -"
            print(f"{max_len:>6} {name:>7} {1e3 * t:>9.3f} {visible_bytes / t / 1e9:>8.1f} {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192], help="example lengths L")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--segments", type=int, default=1, help="packed examples per row")
    parser.add_argument("--mask", default="block_diffusion", choices=masks.MASK_KINDS)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backend", choices=platform.ACCELERATORS, default=None,
                        help="kernel lowering (default: the JAX backend's; gpu when on CPU)")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke runs)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["pallas", "xla", "jax.nn"])
    parser.add_argument("--decode", action="store_true",
                        help="time one decoding step against a KV cache of --seq slots instead")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  device: {device.device_kind} "
          f"({jax.default_backend()})  jax {jax.__version__}  commit {_commit()}  interpret={args.interpret}")
    if args.decode:
        print(f"# decode: batch={args.batch} block={args.block_size} heads={args.heads}/{args.kv_heads} "
              f"head_dim={args.head_dim} dtype={args.dtype}")
        _decode(args)
        return
    print(f"# mask={args.mask} B={args.block_size} segments={args.segments} batch={args.batch} "
          f"heads={args.heads}/{args.kv_heads} head_dim={args.head_dim} dtype={args.dtype}")
    header = f"{'L':>6} {'row':>6} {'dense%':>6} {'method':>7} {'fwd ms':>9} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'fwd x':>6} {'f+b x':>6}"
    print(header)
    for length in args.seq:
        q, k, v, dout, mask = _inputs(args, length)
        methods, dense = _methods(args, mask)
        pairs = float(dense.sum())
        fwd_flops = 4.0 * args.head_dim * args.heads * pairs
        results = {}
        for name, fn in methods.items():
            if name in args.skip:
                continue
            fwd = jax.jit(fn)
            grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.vdot(fn(q, k, v).astype(jnp.float32),
                                                                    dout.astype(jnp.float32)),
                                    argnums=(0, 1, 2)))
            try:
                results[name] = (perf.median_seconds(fwd, q, k, v, repeats=args.repeats),
                                 perf.median_seconds(grad, q, k, v, repeats=args.repeats))
            except Exception as error:  # noqa: BLE001 - report the method that cannot run, keep the rest
                print(f"{length:>6} {q.shape[1]:>6} {'':>6} {name:>7} failed: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:120]}")
        base = results.get("xla")
        for name, (t_fwd, t_both) in results.items():
            ratio_fwd = f"{base[0] / t_fwd:6.2f}" if base else "     -"
            ratio_both = f"{base[1] / t_both:6.2f}" if base else "     -"
            print(f"{length:>6} {q.shape[1]:>6} {100 * pairs / dense.size:>6.1f} {name:>7} "
                  f"{1e3 * t_fwd:>9.3f} {fwd_flops / t_fwd / 1e12:>8.2f} {1e3 * t_both:>11.3f} "
                  f"{3.5 * fwd_flops / t_both / 1e12:>8.2f} {ratio_fwd} {ratio_both}")
    print("# fwd x / f+b x: speed-up over the xla row (higher is better)")
    if args.interpret:
        print("# interpret mode times the Pallas interpreter, not a kernel: these numbers only show the run works")


if __name__ == "__main__":
    main()
