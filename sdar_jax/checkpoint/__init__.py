"""Checkpoints on disk: train checkpoints, params checkpoints, and the atomic directories they go in.

  train_state.py      orbax train checkpoints: state + data iterator + run config,
                      async saves, keep-last-K, newest-intact restore
  integrity.py        per-step integrity records (size + SHA-256) and their checks
  params.py           params checkpoints (config.json + orbax params/): save, load, check
  sharded_restore.py  params restored straight into their shardings; sharded inference set-up
  atomic.py           output directories renamed into place when complete
  dtypes.py           the stored parameter dtypes by name
  tree.py             nested-dict param trees addressed by path tuples
  errors.py           ConversionError and one-line reports of caught errors

Import from the modules (`from sdar_jax.checkpoint.params import load_params_checkpoint`).
"""
