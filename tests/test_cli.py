"""`domex`: every subcommand answers a bad argument with one line on stderr and exit code 2, no traceback."""

import pytest

from domex.runtime.cli import COMMANDS, main
from domex.runtime.pool import build
from tiny import tiny_checkpoint


def one_line_error(capsys, argv) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (argv, code, err)
    return lines[0]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_unknown_flag_is_one_line_and_exit_2(capsys, name):
    line = one_line_error(capsys, [*name.split(), "--no-such-flag"])
    assert line.startswith("domex") and ": error: " in line and ("--no-such-flag" in line or "required" in line)


def test_a_command_without_its_required_arguments(capsys):
    assert "required" in one_line_error(capsys, ["export"])
    assert "invalid choice" in one_line_error(capsys, ["pool", "bogus"])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    build(tiny_checkpoint(root / "model"), root / "pool", progress=False)
    return root / "pool"


def test_bad_values_reach_the_user_as_one_line(capsys, pool, tmp_path):
    import torch

    if not torch.cuda.is_available():
        assert "CUDA is not available" in one_line_error(capsys, ["generate", "--pool", str(pool), "--device", "cuda", "hi"])
    assert "'bogus'" in one_line_error(capsys, ["generate", "--pool", str(pool), "--mode", "bogus", "hi"])
    assert "--budget" in one_line_error(capsys, ["serve", "--pool", str(pool), "--store", str(tmp_path), "--budget", "lots"])
    assert "--pool" in one_line_error(capsys, ["register", "--store", str(tmp_path), "--domain", "x", "demos.jsonl"])
    assert "nothing" in one_line_error(capsys, ["pool", "build", str(tmp_path / "nothing"), str(tmp_path / "p")])
