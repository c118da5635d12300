"""The demo's SDAR stage with one adaptation aid changed: the rows of docs/adaptation.md.

  python launch/train.py --config=configs/demo_ablation.py:ROW \
      --config.train.init_from=AR_EXPORT --config.train.workdir=DIR

ROW (every row starts from the recipe configs/demo.py:sdar had until
2026-12-01: shifted logits, mixed B {4, 8}, bidirectional attention inside
blocks, no AR term, learning rate 3e-3; `previous` is that recipe itself;
every row keeps its steps and forward shape per step):
  previous                     the recipe above
  causal_blocks                causal attention inside blocks (no AR term)
  shifted_mixed_complementary  mixed B {4, 8} plus complementary masking: 4
                               rows noised twice, 8 rows per forward as in the
                               demo's 8-row batches
  shifted_schedule             no mixed B; B = 2 for the first half of the
                               steps, then B = 4 (objective.block_schedule_*)
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections


def _demo_config(stage: str) -> ml_collections.ConfigDict:
    # Config files are loaded by path (not as a package), so the sibling is too.
    spec = importlib.util.spec_from_file_location("demo_config", pathlib.Path(__file__).with_name("demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(stage)

ROWS = ("previous", "causal_blocks", "shifted_mixed_complementary", "shifted_schedule")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in ROWS:
        raise ValueError(f"configs/demo_ablation.py: arg is {arg!r}; expected one of {ROWS}")
    config = _demo_config("sdar")
    config.model.overrides.block_attention = None  # the AR parent's: bidirectional
    config.objective.ar_loss_weight = 0.0
    config.optimizer.peak_lr = 3e-3
    if arg == "previous":
        return config
    if arg == "causal_blocks":
        config.model.overrides.block_attention = "causal"
    elif arg == "shifted_mixed_complementary":
        config.objective.complementary_masking = True
        config.data.global_batch_size = config.data.global_batch_size // 2
    else:
        config.objective.mixed_block_sizes = None
        config.objective.block_schedule_start = 2
        config.objective.block_schedule_steps = config.train.steps // 2
    return config
