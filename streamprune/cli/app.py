"""The `streamprune` command group; each command module registers itself on `app`."""

from __future__ import annotations


import typer

from .options import Version

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    help="Prune large language models one decoder layer at a time, on the hardware you have.",
)


@app.callback()
def main(version: Version = False) -> None:
    """Prune large language models one decoder layer at a time, on the hardware you have."""
