"""The adaptation run's pieces that need no real model: stage configs (the chosen recipe),
decoding rows, the report."""

from __future__ import annotations

import dataclasses

import pytest

from sdar_jax.adaptation import experiment, report


def test_stage_configs_carry_the_chosen_recipe(tmp_path):
    sizes = dataclasses.replace(experiment.QUICK, batch=3, steps={"ar": 20, "sdar": 40})
    sdar = experiment.stage_config(experiment.DEFAULT_CONFIG_FILE, "sdar", "/ckpt", "/t.jsonl",
                                   str(tmp_path), sizes)
    ar = experiment.stage_config(experiment.DEFAULT_CONFIG_FILE, "ar", "/ckpt", "/t.jsonl",
                                 str(tmp_path), sizes)
    assert sdar.model.overrides.logits_convention == "shifted"
    assert sdar.model.overrides.block_attention == "causal" and sdar.objective.ar_loss_weight == 1.0
    assert tuple(sdar.objective.mixed_block_sizes) == (4, 8) and sdar.objective.kind == "sdar"
    assert ar.objective.kind == "ar" and ar.model.overrides.logits_convention is None
    for cfg, steps in ((sdar, 40), (ar, 20)):
        assert (cfg.train.steps, cfg.data.global_batch_size) == (steps, 3)
        assert cfg.train.init_from == cfg.data.tokenizer_dir == "/ckpt"
        assert cfg.data.train_path == "/t.jsonl"
        assert 1 <= cfg.optimizer.warmup_steps < steps
    assert sdar.train.workdir != ar.train.workdir


def test_decode_rows_are_ar_then_every_block_at_the_threshold():
    rows = experiment.decode_rows((4, 8), (2,))
    assert [(r.model, r.decode.mode) for r in rows[:2]] == [("released", "ar"), ("ar", "ar")]
    sdar = [(r.model, r.decode.block_length, r.decode.strategy, r.decode.threshold) for r in rows[2:]]
    assert sdar == [("sdar", 4, "low_confidence_dynamic", 0.9), ("sdar", 8, "low_confidence_dynamic", 0.9)]


def test_sizes_refuse_bad_steps():
    with pytest.raises(ValueError, match="expected"):
        experiment.Sizes(steps={"ar": 3})
    with pytest.raises(ValueError, match="int >= 2"):
        experiment.Sizes(steps={"ar": 3, "sdar": 1})


def _results():
    stage = dict(steps=2, tokens_per_step=512, seconds=30.0, median_step_seconds=12.5,
                 first_loss=9.0, last_loss=8.0)
    row = dict(accuracy=0.25, accuracy_stderr=0.1, tpf=1.5, num_forwards=40,
               tokens_per_second=10.0, sample="#### 3")
    return {
        "command": "python launch/adapt_smollm2.py --quick", "date": "2026-12-01 16:00",
        "commit": "abc", "device": "cpu", "wall_seconds": 120.0, "cpu_seconds": 200.0,
        "corpus": dict(answers_train=3, answers_heldout=1, answers_empty=0, task_train=4,
                       task_heldout_loss=4, task_eval=4),
        "stages": {"ar": {**stage, "config": {"objective": {"kind": "ar", "block_size": 4},
                                              "model": {"overrides": {}}}},
                   "sdar": {**stage, "config": {
                       "objective": {"kind": "sdar", "block_size": 4, "mixed_block_sizes": (4, 8),
                                     "ar_loss_weight": 1.0},
                       "model": {"overrides": {"logits_convention": "shifted",
                                               "block_attention": "causal"}}}}},
        "heldout_loss": {"AR": {"ar": {"loss": 1.5, "accuracy": 0.6}},
                         "SDAR": {"sdar_b4": {"loss": 3.0, "accuracy": 0.4},
                                  "sdar_b8": {"loss": 3.5, "accuracy": 0.3}}},
        "block_sizes": [4, 8], "threshold": 0.9, "max_new_tokens": 48,
        "rows": [{**row, "name": "AR", "accuracy_by_task": {"add": 0.5, "sort": 0.0}},
                 {**row, "name": "SDAR B=4 t=0.9", "accuracy_by_task": {"add": 0.0, "sort": 0.5}}],
    }


def test_report_tables():
    text = report.render(_results())
    lines = text.splitlines()
    assert ("| sdar | SDAR, shifted logits, causal blocks, AR term x1, B from {4, 8} | 2 | 512 | 30 s "
            "| 12.5 | 9.000 -> 8.000 |") in lines
    assert "| AR | 1.500 | n/a | n/a | n/a | n/a |" in lines
    assert "| SDAR | n/a | 3.000 | 3.500 | 0.400 | 0.300 |" in lines
    assert "| SDAR B=4 t=0.9 | 25.0 ± 10.0 | 0 / 50 | 1.50 | 40 | 10.0 |" in lines
    assert "| model, decoding | acc % ± se | add / sort % | TPF | forwards | tokens/s |" in lines
    assert '- AR: "#### 3"' in lines
    with pytest.raises(ValueError, match="a row has 1 cells"):
        report.markdown_table(("a", "b"), [("x",)])
