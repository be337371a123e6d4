"""The `imf` entry point exists and is honest about what is not built yet."""

import pytest

from flows.cli import main


def test_help_lists_the_contract(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("precompute", "train", "evaluate", "run", "sweep", "report"):
        assert command in out


def test_unbuilt_stage_fails_without_fake_output(capsys):
    assert main(["run", "-e", "smoke"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "not built yet" in captured.err
