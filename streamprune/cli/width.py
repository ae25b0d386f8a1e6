"""`streamprune width`: remove whole attention heads and MLP channels (library: width)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..width import WidthConfig, summary
from ..width import width as run_width
from .app import app
from .common import check_one_process, resume_command, user_errors
from .options import (
    BATCH_SIZE,
    SEQLEN,
    AttentionShare,
    Calib,
    Criterion,
    Device,
    Dtype,
    Force,
    MaxShardSize,
    Model,
    Nsamples,
    Out,
    Overlap,
    Quiet,
    Ratio,
    Seed,
)


@app.command()
def width(
    model: Model,
    ratio: Ratio = 0.2,
    criterion: Criterion = "flap",
    attention_share: AttentionShare = None,
    calib: Calib = "c4",
    nsamples: Nsamples = 128,
    seqlen: Annotated[int, SEQLEN] = 2048,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    batch_size: Annotated[int, BATCH_SIZE] = 1,
    overlap: Overlap = True,
    out: Out = ...,
    max_shard_size: MaxShardSize = "5GB",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Width pruning (FLAP, Wanda-sp): remove the same number of whole attention heads and MLP channels from every layer and write a narrower checkpoint.

    Heads go by whole key-value groups where heads share them; config.json gets the smaller intermediate_size, the fewer heads and an explicit head_dim, so transformers loads the result as it is. flap adds the removed channels' mean contribution to the output bias where the family's config can carry one (Llama: attention_bias, mlp_bias), and says in streamprune.json where it could not. A resume point is saved after every layer.
    """

    with user_errors(
        on_interrupt=f"interrupted; the layers done so far are kept in --out. Run again to resume: {resume_command()}",
        on_gpu_oom=f"Lower --batch-size (now {batch_size}) or --seqlen, or use --device cpu.",
        on_disk_full="The layers done so far are kept; free some space, then resume with: " + resume_command(),
    ):
        check_one_process("width")
        config = WidthConfig(
            model=model,
            out=out,
            ratio=ratio,
            criterion=criterion,
            attention_share=attention_share,
            calib=calib,
            nsamples=nsamples,
            seqlen=seqlen,
            seed=seed,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            max_shard_size=max_shard_size,
            overlap=overlap,
            force=force,
            quiet=quiet,
        )
        record = run_width(config)
    typer.echo(summary(record))
