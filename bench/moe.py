"""Dropless grouped experts (sort + grouped matmul + unsort) against a dense all-experts reference.

All variants compute the same MoE output for the same routing; the dense
reference runs every expert on every token (num_experts / top_k times the
FLOPs). The grouped path runs with the grouped matmul chosen by `--impls`:
"auto" (what the model uses: ragged_dot on TPU/GPU, the tiled loop on CPU),
"tiled", "ragged_dot" (on CPU, XLA expands it into a masked matmul over all
experts: slow, so not in the default list).
Shapes default to SDAR-30B-A3B's proportions scaled down (128 experts top-8,
hidden 2048, expert mlp 768 -> 32 experts top-8, hidden 256, expert mlp 96).
Both paths are timed in one run, forward and forward+backward (gradients
with respect to the tokens, the routing weights and all expert weights), and
printed with their ratio.

    python bench/moe.py                       # CPU default, about a minute
    python bench/moe.py --impls auto,ragged_dot --tokens 1024
    python bench/moe.py --tokens 16384 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import functools

import jax
import jax.numpy as jnp

from sdar_jax.ops import grouped_matmul, moe


def _time(fn: Callable, args: tuple, repeats: int) -> float:
    """Median wall time in seconds of `fn(*args)` after one compiling call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _problem(key: jax.Array, tokens: int, hidden: int, mlp: int, num_experts: int, top_k: int, dtype):
    kx, kr, kg, ku, kd = jax.random.split(key, 5)
    x = jax.random.normal(kx, (tokens, hidden), dtype)
    router = jax.random.normal(kr, (hidden, num_experts), jnp.float32) * hidden**-0.5
    routing = moe.route(x.astype(jnp.float32) @ router, top_k, norm_topk_prob=True)
    scale = hidden**-0.5
    gate = (jax.random.normal(kg, (num_experts, hidden, mlp)) * scale).astype(dtype)
    up = (jax.random.normal(ku, (num_experts, hidden, mlp)) * scale).astype(dtype)
    down = (jax.random.normal(kd, (num_experts, mlp, hidden)) * mlp**-0.5).astype(dtype)
    return x, routing, gate, up, down


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--mlp", type=int, default=96, help="expert intermediate size")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--impls", default="auto", help="comma-separated grouped matmul impls to time against dense"
    )
    args = parser.parse_args(argv)
    if not 0 < args.top_k <= args.experts:
        parser.error(f"--top-k {args.top_k} must be in [1, --experts {args.experts}]")
    names = [name.strip() for name in args.impls.split(",") if name.strip()]
    for name in names:
        if name not in grouped_matmul.IMPLS:
            parser.error(f"--impls: {name!r} is not one of {grouped_matmul.IMPLS}")

    dtype = jnp.dtype(args.dtype)
    x, routing, gate, up, down = _problem(
        jax.random.key(0), args.tokens, args.hidden, args.mlp, args.experts, args.top_k, dtype
    )
    impls = {
        f"grouped[{name}]": functools.partial(moe.dropless_experts, impl=name) for name in names
    }
    impls["dense"] = moe.dense_experts_reference

    def forward(impl):
        return jax.jit(impl)

    def forward_backward(impl):
        def loss(x, w, e, g, u, d):
            return jnp.sum(impl(x, w, e, g, u, d).astype(jnp.float32) ** 2)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3, 4, 5)))

    inputs = (x, routing.weights, routing.experts, gate, up, down)
    outs = {name: forward(impl)(*inputs).astype(jnp.float32) for name, impl in impls.items()}
    resolved = {name: grouped_matmul.resolve_impl(name) for name in names}

    print(
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} dtype={args.dtype} "
        f"tokens={args.tokens} hidden={args.hidden} expert_mlp={args.mlp} "
        f"experts={args.experts} top_k={args.top_k} repeats={args.repeats} (median)"
    )
    print("grouped matmul impls: " + ", ".join(f"{k} -> {v}" for k, v in resolved.items()))
    for name, out in outs.items():
        if name == "dense":
            continue
        print(f"max |{name} - dense| = {float(jnp.max(jnp.abs(out - outs['dense']))):.2e}")
    print(f"{'pass':<18}{'variant':<22}{'ms':>10}{'dense/variant':>15}")
    for label, make in (("forward", forward), ("forward+backward", forward_backward)):
        times = {name: _time(make(impl), inputs, args.repeats) for name, impl in impls.items()}
        for name, seconds in times.items():
            print(f"{label:<18}{name:<22}{1e3 * seconds:>10.2f}{times['dense'] / seconds:>15.2f}")
    print(f"(dense/grouped FLOP ratio of the expert matmuls: experts/top_k = {args.experts / args.top_k:.1f})")


if __name__ == "__main__":
    main()
