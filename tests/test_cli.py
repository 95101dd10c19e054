"""The command line, through typer's runner."""

from typer.testing import CliRunner

from intervene.cli import app


def test_methods_lists_every_registered_method():
    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert names == ["act", "heads", "zerotuning"]


def test_help_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "methods" in result.output
