"""sdar_jax.cli: the launchers' shared main() and config loading."""

import argparse

import pytest

from sdar_jax import cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe")
    parser.add_argument("--n", type=int, default=1)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.n < 0:
        raise cli.UsageError(f"--n must be >= 0, got {args.n}")
    if args.n == 7:
        raise KeyError("not a usage error")
    return 0


def test_usage_errors_are_one_line_and_exit_2(capsys):
    assert cli.run_main("probe", _parser(), _run, ["--n", "3"]) == 0
    assert cli.run_main("probe", _parser(), _run, ["--n", "-1"]) == 2
    assert capsys.readouterr().err == "probe: error: --n must be >= 0, got -1\n"


def test_named_error_types_count_as_usage_errors_and_others_propagate(capsys):
    assert cli.run_main("probe", _parser(), _run, ["--n", "7"], usage_errors=(KeyError,)) == 2
    assert capsys.readouterr().err.startswith("probe: error: ")
    with pytest.raises(KeyError):
        cli.run_main("probe", _parser(), _run, ["--n", "7"])


def test_load_config_reads_a_config_file_like_train_py():
    config = cli.load_config("configs/demo.py", "sdar")
    assert config.objective.kind == "sdar"
    assert cli.load_config_module("configs/demo.py").STAGES == ("ar", "sdar")
