"""What the tests of the command line share: running it in-process, its one error line,
and a small memory's flags."""

from __future__ import annotations

from click.testing import CliRunner

from memcompile.cli import main

SMALL = ["--mem-size", "256", "--knn", "4", "--heads", "2", "--quiet"]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="memcompile")


def one_error(result) -> str:
    """The one `error:` line of a refused command, which must exit 2."""
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]
