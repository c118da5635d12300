"""launch/evaluate.py's grading flags: --style and --gsm8k-extract pick the answers style."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli_grading",
                                                  os.path.join(ROOT, "launch", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, style", [
    ([], "gsm8k"),
    (["--gsm8k-extract", "strict-match"], "gsm8k_strict"),
    (["--gsm8k-extract", "flexible-extract"], "gsm8k_flexible"),
    (["--style", "math"], "math"),
    (["--style", "math_hendrycks"], "math_hendrycks"),
])
def test_grading_flags_pick_the_style(cli, argv, style):
    args = cli.build_parser().parse_args(["--ckpt", "c", "--data", "d"] + argv)
    assert cli._style(args) == style


def test_gsm8k_extract_with_another_style_exits_2(cli, capsys):
    rc = cli.main(["--ckpt", "c", "--data", "d", "--style", "math", "--gsm8k-extract", "strict-match"])
    assert rc == 2
    assert "--gsm8k-extract strict-match needs --style gsm8k" in capsys.readouterr().err
