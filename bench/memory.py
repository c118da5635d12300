"""Compiled per-device memory of SDAR-8B and SDAR-30B-A3B on 8- and 64-device meshes.

Nothing is allocated: every program is lowered from abstract shapes
(ShapeDtypeStructs with the run's shardings) under the run's
`ShardingContext` and compiled, and the numbers are the compiled
executable's `memory_analysis()` for one device (arguments + outputs -
donated aliases + temporaries). Two programs per model:

  train   one step of the trainer's jitted `train_step` (SDAR objective on
          4096-token rows, i.e. 8192-token [xt ; x0] model rows; the recipe's
          bfloat16 compute, float32 params and AdamW moments, full remat,
          chunked cross-entropy), `--rows-per-shard` rows per batch shard;
  decode  one denoising forward of the decoder at batch 64 against a
          4096-position bfloat16 KV cache (bfloat16 params, 2 x block 4 =
          8 tokens a row, the cache donated), the step the decode loop repeats.

For each (model, devices, program) the candidate layouts are compiled and
the table marks those whose total fits a 16 GB chip (`--hbm-gb`), and names
the smallest one that fits. The devices are fake CPU devices
(`--xla_force_host_platform_device_count`), so the figures are XLA:CPU's
buffer assignment for the partitioned program: the sharding (GSPMD) is the
one an accelerator gets, but kernels differ: attention runs the `--attention`
implementation ("pallas", the default: the flash-attention and decode kernels
an accelerator runs, here in the Pallas interpreter; "xla": the reference,
which materialises [q, kv] float32 scores per layer), the MoE grouped matmul
is the tiled XLA loop, and XLA:CPU may keep float32 copies of bfloat16
operands that an accelerator would not.

    python bench/memory.py                           # everything (slow: many large compiles)
    python bench/memory.py --models sdar-8b --devices 8 --programs decode
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

MAX_DEVICES = 64
if "jax" not in sys.modules:  # fake devices must be requested before jax starts
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={MAX_DEVICES}"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sdar_jax import parallel  # noqa: E402
from sdar_jax.model import sharding as model_sharding  # noqa: E402
from sdar_jax.model import transformer  # noqa: E402
from sdar_jax.ops.masks import MaskSpec  # noqa: E402
from sdar_jax.train import config as train_config  # noqa: E402
from sdar_jax.train import optimizer as optimizer_lib  # noqa: E402
from sdar_jax.train import step as step_lib  # noqa: E402
from sdar_jax.train.state import abstract_train_state  # noqa: E402

GB = 1e9
SEQ_LEN = 4096
DECODE_BATCH = 64
CACHE_LEN = 4096
BLOCK = 4

# Candidate layouts (the `--mesh` syntax) per (model, devices, program). On 8 devices the
# float32 params and AdamW moments alone (12.3 GB / 45.8 GB per device for 8B / 30B-A3B) exceed
# a 16 GB chip whatever the layout, so one layout each shows it.
CANDIDATES = {
    ("sdar-8b", 8, "train"): ("fsdp=8",),
    ("sdar-8b", 64, "train"): ("fsdp=64", "fsdp=16,tensor=4"),
    ("sdar-8b", 8, "decode"): ("fsdp=8", "tensor=8", "data=2,tensor=4"),
    ("sdar-8b", 64, "decode"): ("fsdp=64", "fsdp=8,tensor=8"),
    ("sdar-30b-a3b", 8, "train"): ("fsdp=1,expert=8",),
    ("sdar-30b-a3b", 64, "train"): ("fsdp=8,expert=8",),
    ("sdar-30b-a3b", 8, "decode"): ("fsdp=1,expert=8", "tensor=4,expert=2"),
    ("sdar-30b-a3b", 64, "decode"): ("fsdp=8,expert=8", "tensor=4,expert=16"),
}


def _memory(compiled) -> dict[str, float]:
    stats = compiled.memory_analysis()
    args, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    return dict(args=args / GB, temp=temp / GB, total=(args + out - alias + temp) / GB)


def _run_config(preset: str, mesh: parallel.ParallelConfig, global_batch: int, attention: str):
    config = train_config.sdar_recipe(
        "pretrain", remat_policy="full", mesh=mesh.axis_sizes, seq_len=SEQ_LEN, global_batch_size=global_batch
    )
    config.model.preset = preset
    config.model.attention_impl = attention
    return config


def train_memory(preset: str, context: parallel.ShardingContext, rows_per_shard: int, attention: str):
    """memory_analysis of one train step; returns (stats, global batch)."""
    shape = context.mesh_shape
    batch_axes = context.batch_spec((1 << 20,))[0]  # the batch rule's axes on this mesh
    batch_axes = () if batch_axes is None else ((batch_axes,) if isinstance(batch_axes, str) else batch_axes)
    global_batch = math.prod(shape[a] for a in batch_axes) * rows_per_shard
    config = _run_config(preset, parallel.ParallelConfig(**shape), global_batch, attention)
    model = train_config.model_config(config)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
    abstract = abstract_train_state(model, tx)
    state_sh = model_sharding.state_shardings(abstract, model, context)
    batch = {
        key: jax.ShapeDtypeStruct((global_batch, SEQ_LEN), jnp.bool_ if key == "loss_mask" else jnp.int32)
        for key in ("tokens", "segment_ids", "positions", "loss_mask")
    }
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.train.steps)
    step = step_lib.compile_train_step(
        config, model, tx, schedule, state_shardings=state_sh, batch_shardings=context.batch_shardings(batch)
    )
    with context.activate():
        compiled = step.lower(abstract, batch).compile()
    return _memory(compiled), global_batch


def decode_memory(preset: str, context: parallel.ShardingContext, attention: str):
    """memory_analysis of one cached denoising forward at batch 64, 4096-position cache."""
    model = train_config.model_config(_run_config(preset, parallel.ParallelConfig(), 1, attention)).replace(
        param_dtype="bfloat16"
    )
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), model_sharding.param_shapes(model)
    )
    cache = jax.eval_shape(lambda: transformer.init_cache(model, DECODE_BATCH, CACHE_LEN))
    rows = jax.ShapeDtypeStruct((DECODE_BATCH, 2 * BLOCK), jnp.int32)
    row_sh = context.batch_shardings(rows, strict=False)

    def forward(params, cache, tokens, positions):
        out = transformer.apply(
            model, params, tokens, positions, mask=MaskSpec("block_causal", BLOCK), cache=cache,
            logits_slice=(BLOCK, 2 * BLOCK),
        )
        return out.logits, out.cache

    cache_sh = context.cache_shardings(cache)
    fn = jax.jit(
        forward, donate_argnums=1,
        in_shardings=(model_sharding.param_shardings(model, context), cache_sh, row_sh, row_sh),
        out_shardings=(None, cache_sh),
    )
    with context.activate():
        compiled = fn.lower(params, cache, rows, rows).compile()
    return _memory(compiled), DECODE_BATCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sdar-8b,sdar-30b-a3b")
    parser.add_argument("--devices", default="8,64", help="mesh sizes, each <= %d" % MAX_DEVICES)
    parser.add_argument("--programs", default="decode,train")
    parser.add_argument("--rows-per-shard", type=int, default=1, help="train rows per batch shard")
    parser.add_argument("--hbm-gb", type=float, default=16.0, help="memory of one chip")
    parser.add_argument("--attention", default="pallas", choices=("xla", "pallas"))
    args = parser.parse_args()

    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"attention={args.attention}; GB = 1e9 bytes per device", flush=True)
    print("| model | devices | program | mesh | batch | args GB | temp GB | total GB | fits |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    best = {}
    for preset in args.models.split(","):
        for devices in (int(d) for d in args.devices.split(",")):
            for program in args.programs.split(","):
                for mesh in CANDIDATES[(preset, devices, program)]:
                    pconfig = parallel.parse_mesh_spec(mesh)
                    context = parallel.ShardingContext.from_config(pconfig, jax.devices()[:devices])
                    start = time.perf_counter()
                    if program == "train":
                        stats, batch = train_memory(preset, context, args.rows_per_shard, args.attention)
                    else:
                        stats, batch = decode_memory(preset, context, args.attention)
                    fits = stats["total"] <= args.hbm_gb
                    key = (preset, devices, program)
                    if fits and (key not in best or stats["total"] < best[key][1]):
                        best[key] = (mesh, stats["total"])
                    print(f"| {preset} | {devices} | {program} | {mesh} | {batch} | {stats['args']:.2f} | "
                          f"{stats['temp']:.2f} | {stats['total']:.2f} | {'yes' if fits else 'no'} |"
                          f"  <!-- compiled in {time.perf_counter() - start:.0f} s -->", flush=True)
    print(f"\nlayout that fits {args.hbm_gb:g} GB (smallest total):", flush=True)
    for preset in args.models.split(","):
        for devices in (int(d) for d in args.devices.split(",")):
            for program in args.programs.split(","):
                mesh, total = best.get((preset, devices, program), ("none of the candidates", float("nan")))
                print(f"  {preset} on {devices} devices, {program}: {mesh} ({total:.2f} GB)", flush=True)


if __name__ == "__main__":
    main()
