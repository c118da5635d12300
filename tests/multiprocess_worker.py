"""One process of the two-process training test (tests/test_multiprocess.py).

Run as a script, it joins a local multi-process run through
`sdar_jax.distributed.initialize_distributed`, trains a tiny SDAR model for a
few steps on one global mesh spanning every process's CPU devices, saves the
train state with orbax (every process writes its own shards) and writes its
losses and the gathered final params to `--out`. Imported, `train_steps` is the
same training code for the single-process reference.

    python tests/multiprocess_worker.py --coordinator 127.0.0.1:PORT \
        --num-processes 2 --process-id 0 --devices 4 --mesh data=2,fsdp=2,tensor=2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

if __name__ == "__main__":
    # Before jax is imported: this process's CPU devices, and the repository on the path.
    _args = sys.argv[sys.argv.index("--devices") + 1] if "--devices" in sys.argv else "4"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_args}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from sdar_jax import parallel  # noqa: E402
from sdar_jax.distributed import DistributedConfig, initialize_distributed  # noqa: E402
from sdar_jax.train import config as run_config  # noqa: E402
from sdar_jax.train import optimizer, step  # noqa: E402
from sdar_jax.train.state import TrainState, abstract_train_state, create_train_state  # noqa: E402

GLOBAL_BATCH = 8
SEQ_LEN = 16


def run_config_for_test() -> ml_collections.ConfigDict:
    """The tiny SDAR run every process (and the reference) trains."""
    config = run_config.base_config()
    config.model.preset = "tiny"
    config.data.seq_len = SEQ_LEN
    config.data.global_batch_size = GLOBAL_BATCH
    config.optimizer.update(peak_lr=1e-3, warmup_steps=1, weight_decay=0.01)
    config.train.steps = 3
    return config


def global_batch(step_index: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Step `step_index`'s global batch: two packed examples per row, the first block a prompt."""
    rng = np.random.default_rng(step_index)
    half = SEQ_LEN // 2
    tokens = rng.integers(2, vocab_size - 1, (GLOBAL_BATCH, SEQ_LEN), dtype=np.int32)
    segment_ids = np.repeat(np.array([1, 2], np.int32), half)[None].repeat(GLOBAL_BATCH, 0)
    positions = np.tile(np.arange(half, dtype=np.int32), 2)[None].repeat(GLOBAL_BATCH, 0)
    loss_mask = positions >= 4
    return dict(tokens=tokens, positions=positions, segment_ids=segment_ids, loss_mask=loss_mask)


def train_steps(
    layout: parallel.ParallelConfig, devices: list | None = None
) -> tuple[list[float], TrainState, Any]:
    """Trains config.train.steps steps on the mesh `layout` over `devices` (default: all).

    Returns:
      (per-step losses, final TrainState, the state's shardings).
    """
    config = run_config_for_test()
    model = run_config.model_config(config)
    run_config.validate(config, model)
    steps = config.train.steps
    schedule = optimizer.learning_rate_schedule(config.optimizer, steps)
    tx = optimizer.make_optimizer(config.optimizer, steps)

    mesh = parallel.make_mesh(layout, devices)
    state_shardings = parallel.state_shardings(abstract_train_state(model, tx), model, layout, mesh)
    batch_shape = jax.ShapeDtypeStruct((GLOBAL_BATCH, SEQ_LEN), np.int32)
    batch_shardings = parallel.batch_shardings(
        dict.fromkeys(("tokens", "positions", "segment_ids", "loss_mask"), batch_shape), layout, mesh
    )
    rows = parallel.process_batch_slice(batch_shardings["tokens"], GLOBAL_BATCH)
    train_step = step.compile_train_step(
        config, model, tx, schedule, state_shardings=state_shardings, batch_shardings=batch_shardings
    )
    losses = []
    with jax.set_mesh(mesh):
        state = jax.jit(lambda r: create_train_state(model, tx, r), out_shardings=state_shardings)(
            jax.random.key(0)
        )
        for i in range(steps):
            local = {k: v[rows] for k, v in global_batch(i, model.vocab_size).items()}
            batch = parallel.shard_batch(local, batch_shardings, GLOBAL_BATCH)
            state, metrics = train_step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses, state, state_shardings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--devices", type=int, default=4, help="CPU devices of this process")
    parser.add_argument("--mesh", required=True, help="axis=size,... e.g. data=2,fsdp=2,tensor=2")
    parser.add_argument("--out", required=True, help="directory for results and the checkpoint")
    args = parser.parse_args()

    jax.config.update("jax_default_matmul_precision", "highest")
    initialize_distributed(DistributedConfig(
        coordinator_address=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id, initialization_timeout_s=120,
    ))
    sizes = {k: int(v) for k, v in (item.split("=") for item in args.mesh.split(","))}
    layout = parallel.ParallelConfig(**{"data": 1, **sizes})
    losses, state, _ = train_steps(layout)

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(args.out, "checkpoint"), state)
    checkpointer.wait_until_finished()
    params = multihost_utils.process_allgather(state.params, tiled=True)
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(args.out, f"params_{args.process_id}.npz"), **flat)
    with open(os.path.join(args.out, f"result_{args.process_id}.json"), "w") as f:
        json.dump(dict(
            losses=losses, process_count=jax.process_count(), device_count=jax.device_count(),
            local_device_count=jax.local_device_count(),
        ), f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
