"""`streamprune fetch-data`: local copies of the standard data, for offline use (library: prefetch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..data import DATA_ENV
from ..prefetch import fetch_data
from .app import app
from .common import user_errors
from .options import C4, Tasks


@app.command(name="fetch-data")
def fetch_data_command(
    folder: Annotated[Path, typer.Argument(help="The data folder to fill (created if missing).")],
    c4: C4 = False,
    tasks: Tasks = None,
) -> None:
    """Download the standard data into FOLDER for offline use: WikiText-2 (eval --ppl wikitext2), optionally C4.

    Point STREAMPRUNE_DATA at FOLDER afterwards. With --tasks, lm-evaluation-harness's datasets of those tasks are downloaded into the hub cache too, so that eval --tasks works offline.
    """
    with user_errors(on_interrupt="interrupted; run the same command again to finish", on_gpu_oom=""):
        names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []
        for line in fetch_data(folder, c4=c4, tasks=names):
            typer.echo(line)
    typer.echo(f"offline, use it with: export {DATA_ENV}={folder}")
