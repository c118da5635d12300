"""One process of the two-process training test (tests/test_multiprocess.py).

Run as a script, it joins a local multi-process run through
`sdar_jax.distributed.initialize_distributed` and runs the project's training
loop (`sdar_jax.train.loop.train`) for a few steps on one global mesh spanning
every process's CPU devices: each process feeds its own rows of every global
batch, the loop checkpoints the train state (every process writes its shards
and its data-iterator state) and exports the final params. The per-step
metrics go to `<workdir>/result_<process>.json`. Imported, `run` is the same
training for the single-process reference.

    python tests/multiprocess_worker.py --coordinator 127.0.0.1:PORT \
        --num-processes 2 --process-id 0 --devices 4 --mesh data=2,fsdp=2,tensor=2 --workdir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__":
    # Before jax is imported: this process's CPU devices, and the repository on the path.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.helpers.processes import with_device_count  # stdlib only: jax is not imported

    _devices = sys.argv[sys.argv.index("--devices") + 1] if "--devices" in sys.argv else "4"
    os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), _devices)
    os.environ["JAX_PLATFORMS"] = "cpu"

import grain  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from sdar_jax import parallel  # noqa: E402
from sdar_jax.distributed import DistributedConfig, initialize_distributed  # noqa: E402
from sdar_jax.train import config as run_config  # noqa: E402
from sdar_jax.train import loop  # noqa: E402

GLOBAL_BATCH = 8
SEQ_LEN = 16
STEPS = 3


def make_config(workdir: str, mesh: dict[str, int]) -> ml_collections.ConfigDict:
    """The tiny SDAR run every process (and the reference) trains, on the mesh `mesh`."""
    config = run_config.base_config()
    config.model.preset = "tiny"
    config.data.seq_len = SEQ_LEN
    config.data.global_batch_size = GLOBAL_BATCH
    config.optimizer.update(peak_lr=1e-3, warmup_steps=1, weight_decay=0.01)
    config.train.update(
        steps=STEPS, checkpoint_every=STEPS, keep=1, log_every=1, workdir=workdir,
        progress_bar=False, async_checkpointing=False,
    )
    config.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **mesh})
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


def local_batches(rows: slice, vocab_size: int):
    """A grain iterator of this process's rows of each step's global batch."""
    batches = [{k: v[rows] for k, v in global_batch(i, vocab_size).items()} for i in range(STEPS)]
    return iter(grain.MapDataset.source(batches).to_iter_dataset())


def run(workdir: str, mesh: dict[str, int], devices: list | None = None) -> loop.TrainResult:
    """Trains STEPS steps with the training loop on `mesh` over `devices` (default: all)."""
    config = make_config(workdir, mesh)
    model = run_config.model_config(config)
    context = parallel.ShardingContext.from_config(parallel.ParallelConfig.from_mapping(config.mesh), devices)
    batch_sharding = context.batch_shardings(
        {"tokens": jax.ShapeDtypeStruct((GLOBAL_BATCH, SEQ_LEN), np.int32)}
    )["tokens"]
    rows = parallel.process_batch_slice(batch_sharding, GLOBAL_BATCH)
    return loop.train(config, train_data=local_batches(rows, model.vocab_size), devices=devices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--devices", type=int, default=4, help="CPU devices of this process")
    parser.add_argument("--mesh", required=True, help="axis=size,... e.g. data=2,fsdp=2,tensor=2")
    parser.add_argument("--workdir", required=True, help="the run's workdir (shared by the processes)")
    args = parser.parse_args()

    jax.config.update("jax_default_matmul_precision", "highest")
    initialize_distributed(DistributedConfig(
        coordinator_address=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id, initialization_timeout_s=120,
    ))
    mesh = {k: int(v) for k, v in (item.split("=") for item in args.mesh.split(","))}
    result = run(args.workdir, mesh)
    with open(os.path.join(args.workdir, f"result_{args.process_id}.json"), "w") as f:
        json.dump(dict(
            history=result.history, step=result.step, export_dir=result.export_dir,
            process_count=jax.process_count(), device_count=jax.device_count(),
            local_device_count=jax.local_device_count(),
        ), f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
