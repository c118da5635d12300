"""SDAR-8B: the AR -> block-diffusion adaptation at paper scale (spec §2).

  python launch/train.py --config=configs/sdar_8b.py:pretrain \
      --config.train.init_from=/ckpt/qwen3-8b-base-jax \
      --config.data.train_path='/data/pretrain/*.jsonl' \
      --config.data.tokenizer_dir=/ckpt/sdar-tokenizer --config.train.workdir=/runs/sdar-8b
  python launch/train.py --config=configs/sdar_8b.py:sft \
      --config.train.init_from=/runs/sdar-8b/export ...

The architecture comes from the init_from checkpoint's config.json; see
`sdar_jax.train.config.sdar_recipe` for the settings and where they come from.
"""

import ml_collections

from sdar_jax.train.config import sdar_recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: the stage, "pretrain" (default) or "sft"."""
    return sdar_recipe(arg, remat_policy="full", mesh=dict(data=1, fsdp=-1))
