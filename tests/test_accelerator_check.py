"""bench/accelerator_check.py --smoke: every section's code path runs (interpret mode, tiny shapes)."""

import importlib.util
import json
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "accelerator_check.py")


def _load():
    spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_writes_a_complete_report(tmp_path):
    check = _load()
    # A made-up peak, so the MFU and roofline code runs too (a CPU is not in the device table).
    assert check.main(["--smoke", "--out", str(tmp_path), "--peak-tflops", "1", "--hbm-tbps", "1",
                       "--compilation-cache", "off"]) == 0
    report = json.loads((tmp_path / "accelerator_check.json").read_text())
    for section in check.SECTIONS:
        assert section in report, section

    def units(x):
        if isinstance(x, dict):
            yield x
            for value in x.values():
                yield from units(value)
        elif isinstance(x, list):
            for value in x:
                yield from units(value)

    problems = [u for name in check.SECTIONS for u in units(report[name]) if "error" in u or "skipped" in u]
    assert not problems, problems
    assert {(r["kernel"], r["dtype"]) for r in report["correctness"]} == {
        ("training fwd+bwd", "float32"), ("decode", "float32")}  # the other sections run bf16
    assert all(r["pass"] for r in report["correctness"])
    assert report["train_step"]["step_s"] > 0 and report["train_step"]["mfu"] > 0
    assert [r.get("tpf") for r in report["decode"][1:]] == [1.0, 1.0]  # B=4, 4 static steps
    assert report["decode"][1]["roofline_fraction"] > 0
    text = (tmp_path / "accelerator_check.md").read_text()
    assert "## Correctness" in text and "## Decoding" in text


def test_bad_output_directory_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _load().main(["--smoke", "--out", str(blocker / "sub")]) == 2
    assert "--out" in capsys.readouterr().err


def test_full_mode_refuses_a_cpu(tmp_path, capsys):
    assert _load().main(["--out", str(tmp_path), "--compilation-cache", "off"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_targets_are_judged_from_the_report():
    check = _load()
    report = {"attention": [{"L": 4096, "method": "pallas", "vs_xla": 2.0},
                            {"L": 2048, "method": "pallas", "vs_xla": 1.0}],
              "train_step": {"mfu": 0.40},
              "decode": [{"stage": "init params"}, {"batch": 1, "roofline_fraction": 0.8},
                         {"batch": 128, "tokens_per_s": 12_000.0}]}
    met = {name: t["met"] for name, t in check.judge_targets(report).items()}
    assert met == {"attention_4k_vs_xla": True, "train_mfu": False, "decode_b128_tokens_per_s": True,
                   "decode_b1_roofline_fraction": True}
    assert check.judge_targets({})["train_mfu"]["met"] is None


def test_half_a_peak_override_exits_2(tmp_path, capsys):
    assert _load().main(["--smoke", "--out", str(tmp_path), "--peak-tflops", "100"]) == 2
    assert "--hbm-tbps" in capsys.readouterr().err
