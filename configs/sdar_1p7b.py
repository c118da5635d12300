"""SDAR-1.7B: the AR -> block-diffusion adaptation at paper scale (spec §2).

  python launch/train.py --config=configs/sdar_1p7b.py:pretrain \
      --config.train.init_from=/ckpt/qwen3-1.7b-base-jax \
      --config.data.train_path='/data/pretrain/*.jsonl' \
      --config.data.tokenizer_dir=/ckpt/sdar-tokenizer --config.train.workdir=/runs/sdar-1p7b
  python launch/train.py --config=configs/sdar_1p7b.py:sft \
      --config.train.init_from=/runs/sdar-1p7b/export ...

The architecture comes from the init_from checkpoint's config.json; see
`sdar_jax.train.config.sdar_recipe` for the settings and where they come from.
"""

import ml_collections

from sdar_jax.train.config import sdar_recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: the stage, "pretrain" (default) or "sft"."""
    return sdar_recipe(arg, remat_policy="dots_with_no_batch_dims_saveable", mesh=dict(data=1, fsdp=-1))
