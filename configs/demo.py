"""The two training runs of the embedded AR -> SDAR demo (`launch/demo.py`).

  get_config("ar")    trains a tiny Qwen3-style model from scratch with the
                      next-token (AR) objective on the shipped tasks;
  get_config("sdar")  continues from the AR run's exported params with the
                      SDAR block-diffusion objective, as the paper adapts its
                      AR checkpoints; set `train.init_from`. The recipe of
                      docs/adaptation.md: the `shifted` logits convention
                      (the AR head keeps predicting the next token), causal
                      attention inside blocks with an AR term on the clean
                      half (committed tokens are read as an AR model reads
                      them, and that reading keeps being trained), mixed B
                      (every step at block 4 or 8, so one model decodes at
                      both block lengths) and a third of the AR stage's
                      learning rate.

Sized for a 2-core CPU: the whole demo (both runs, then seven evaluations)
is meant to fit in about fifteen minutes there (docs/adaptation.md has the
measured times). The data are a procedural stream of the add, sort and word
tasks (`sdar_jax.data.procedural`: fresh prompt/response pairs, never a
prompt of the shipped test split; SFT: prompts stay clean and carry no loss)
with the character-level demo tokenizer (`<MASK>` = 4, `<|endoftext|>` = 1,
`<|im_end|>` = 3).
"""

import ml_collections

from sdar_jax.data import procedural
from sdar_jax.data.tokenizer import CHAR_TOKENIZER_DIR
from sdar_jax.train.config import base_config

STAGES = ("ar", "sdar")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: "ar" (default) or "sdar"."""
    stage = arg or "ar"
    if stage not in STAGES:
        raise ValueError(f"configs/demo.py: arg is {arg!r}; expected one of {STAGES}")
    config = base_config()

    if stage == "ar":
        config.model.preset = "tiny"
        config.model.overrides.update(dict(
            vocab_size=104,  # the char tokenizer's 103 ids, rounded up to a multiple of 8
            hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
            intermediate_size=384, max_position_embeddings=256,
            mask_token_id=4, bos_token_id=1, eos_token_id=1,
        ))
    else:
        # The architecture comes from train.init_from (the AR export); the convention
        # is written into the SDAR export's config.json, which the decoder honours.
        config.model.overrides.logits_convention = "shifted"
        config.model.overrides.block_attention = "causal"
        config.objective.mixed_block_sizes = (4, 8)
        config.objective.ar_loss_weight = 1.0

    config.objective.kind = stage
    config.objective.block_size = 4

    config.data.train_path = procedural.spec_for(("add", "sort", "word"))
    config.data.tokenizer_dir = CHAR_TOKENIZER_DIR
    config.data.seq_len = 128  # examples are <= 100 tokens (block-padded); rows pack ~2
    config.data.global_batch_size = 8
    config.data.read_threads = 1

    # The SDAR stage at a third of the AR stage's rate: at 3e-3 it forgets what the AR
    # parent knew (docs/adaptation.md: 7 % against 13-15 % at 3e-4 to 1e-3).
    config.optimizer.peak_lr = 3e-3 if stage == "ar" else 1e-3
    config.optimizer.warmup_steps = 50 if stage == "ar" else 20
    config.optimizer.end_lr_ratio = 0.05
    config.optimizer.weight_decay = 0.0
    config.optimizer.b2 = 0.99

    config.train.steps = 1600 if stage == "ar" else 1300
    config.train.log_every = 50
    config.train.eval_every = config.train.steps
    config.train.checkpoint_every = config.train.steps  # one checkpoint, at the end
    config.train.keep = 1
    config.train.async_checkpointing = False
    return config
