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
    assert check.main(["--smoke", "--out", str(tmp_path)]) == 0
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
    assert {r["dtype"] for r in report["correctness"]} == {"float32", "bfloat16"}
    assert all(r["pass"] for r in report["correctness"])
    assert report["train_step"]["step_s"] > 0 and report["train_step"]["useful_tflops"] > 0
    assert [r.get("tpf") for r in report["decode"][1:]] == [1.0, 1.0]  # B=4, 4 static steps
    text = (tmp_path / "accelerator_check.md").read_text()
    assert "## Correctness" in text and "## Decoding" in text


def test_bad_output_directory_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _load().main(["--smoke", "--out", str(blocker / "sub")]) == 2
    assert "--out" in capsys.readouterr().err


def test_full_mode_refuses_a_cpu(tmp_path, capsys):
    assert _load().main(["--out", str(tmp_path)]) == 2
    assert "needs a GPU" in capsys.readouterr().err
