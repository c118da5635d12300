"""A tiny SDAR model trained on the shipped arithmetic / sorting / word tasks.

Runs on a laptop CPU in minutes:

  python launch/train.py --config=configs/tiny.py --config.train.workdir=/tmp/tiny
  python launch/train.py --config=configs/tiny.py:ar ...   # the AR baseline

The data are `sdar_jax/data/assets/tasks/{train,test}.jsonl` (prompt /
response pairs, trained as SFT: prompts stay clean and carry no loss) with the
character-level demo tokenizer (103 tokens, `<MASK>` = 4, `<|endoftext|>` = 1).
"""

import ml_collections

from sdar_jax.data.tasks import TASK_DIR
from sdar_jax.data.tokenizer import CHAR_TOKENIZER_DIR
from sdar_jax.train.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: "sdar" (default) or "ar"."""
    kind = arg or "sdar"
    if kind not in ("sdar", "ar"):
        raise ValueError(f"configs/tiny.py: arg is {arg!r}; expected 'sdar' or 'ar'")
    config = base_config()

    config.model.preset = "tiny"  # 3 layers, hidden 64, 4 heads / 2 kv heads
    # The char tokenizer's ids; the vocabulary is rounded up from 103 to 128.
    config.model.overrides.update(dict(
        vocab_size=128, mask_token_id=4, bos_token_id=1, eos_token_id=1,
    ))

    config.objective.kind = kind
    config.objective.block_size = 4

    config.data.train_path = f"{TASK_DIR}/train.jsonl"
    config.data.eval_path = f"{TASK_DIR}/test.jsonl"
    config.data.tokenizer_dir = CHAR_TOKENIZER_DIR
    config.data.seq_len = 256  # the longest example is 96 tokens; rows pack 3-4
    config.data.global_batch_size = 16
    config.data.read_threads = 1

    config.optimizer.peak_lr = 2e-3
    config.optimizer.warmup_steps = 20
    config.optimizer.end_lr_ratio = 0.1
    config.optimizer.weight_decay = 0.1
    config.optimizer.b2 = 0.99

    config.train.steps = 300
    config.train.log_every = 10
    config.train.eval_every = 100
    config.train.eval_batches = 4
    config.train.checkpoint_every = 100
    config.train.keep = 2
    config.required = ("train.workdir",)
    return config
