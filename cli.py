"""The `intervene` command line. Heavy imports happen inside commands so that `--help` is instant."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="intervene",
    help="Training-free attention interventions for Hugging Face models.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Training-free attention interventions for Hugging Face models."""


@app.command()
def methods() -> None:
    """List the registered interventions."""
    import intervene

    for name, description in intervene.methods().items():
        typer.echo(f"{name:<12} {description}")


def main() -> None:
    app()
