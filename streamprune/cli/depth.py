"""`streamprune depth`: remove whole decoder blocks (library: depth)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..depth import DepthConfig, summary
from ..depth import depth as run_depth
from .app import app
from .common import check_one_process, resume_command, user_errors
from .options import (
    BATCH_SIZE,
    CHECKPOINT_MINUTES,
    Calib,
    Criterion,
    Device,
    Dtype,
    Force,
    Iterative,
    KeepFirst,
    KeepLast,
    MaxShardSize,
    MaxStreams,
    Model,
    Nsamples,
    Out,
    Overlap,
    Quiet,
    Ratio,
    Reconstruct,
    ReconstructBatchSize,
    ReconstructEpochs,
    ReconstructLr,
    ReconstructNsamples,
    ReconstructOptimizer,
    ReconstructSeqlen,
    Remove,
    SEQLEN,
    ScoresOnly,
    Seed,
)


@app.command()
def depth(
    model: Model,
    remove: Remove = None,
    ratio: Ratio = None,
    criterion: Criterion = "ppl",
    keep_first: KeepFirst = 4,
    keep_last: KeepLast = 2,
    iterative: Iterative = False,
    calib: Calib = "c4",
    nsamples: Nsamples = 10,
    seqlen: Annotated[int, SEQLEN] = 128,
    seed: Seed = 1234,
    reconstruct: Reconstruct = False,
    reconstruct_epochs: ReconstructEpochs = 4,
    reconstruct_lr: ReconstructLr = 1e-3,
    reconstruct_batch_size: ReconstructBatchSize = 1,
    reconstruct_optimizer: ReconstructOptimizer = "adam",
    reconstruct_nsamples: ReconstructNsamples = 32,
    reconstruct_seqlen: ReconstructSeqlen = 512,
    device: Device = "auto",
    dtype: Dtype = "auto",
    batch_size: Annotated[int, BATCH_SIZE] = 1,
    max_streams: MaxStreams = None,
    overlap: Overlap = True,
    checkpoint_minutes: Annotated[float, CHECKPOINT_MINUTES] = 5.0,
    out: Out = ...,
    scores_only: ScoresOnly = False,
    max_shard_size: MaxShardSize = "5GB",
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Depth pruning (Shortened LLaMA): remove the lowest-scoring whole decoder blocks and write a shorter checkpoint.

    Every block is scored; the output's blocks are renumbered and its config.json made consistent. Beside it: depth_scores.json and .csv (a score per block) and depth_scores.png (a bar chart, removed blocks marked). Unlike 50% sparsity, fewer blocks make batch-1 generation faster on every runtime.
    """

    with user_errors(
        on_interrupt="interrupted; no loadable checkpoint was left in --out. The scoring's last save (every "
        f"--checkpoint-minutes) and finished block scores are reused: run again to go on: {resume_command()}",
        on_gpu_oom=f"Lower --batch-size (now {batch_size}) or use --device cpu.",
        on_disk_full="No loadable checkpoint was left in --out; the block scores are kept. Free some space, then "
        f"run the same command again: {resume_command()}",
    ):
        check_one_process("depth")
        config = DepthConfig(
            model=model,
            out=out,
            criterion=criterion,
            remove=remove,
            ratio=ratio,
            keep_first=keep_first,
            keep_last=keep_last,
            iterative=iterative,
            scores_only=scores_only,
            calib=calib,
            nsamples=nsamples,
            seqlen=seqlen,
            seed=seed,
            batch_size=batch_size,
            max_streams=max_streams,
            device=device,
            dtype=dtype,
            max_shard_size=max_shard_size,
            checkpoint_minutes=checkpoint_minutes,
            overlap=overlap,
            reconstruct=reconstruct,
            reconstruct_epochs=reconstruct_epochs,
            reconstruct_lr=reconstruct_lr,
            reconstruct_batch_size=reconstruct_batch_size,
            reconstruct_optimizer=reconstruct_optimizer,
            reconstruct_nsamples=reconstruct_nsamples,
            reconstruct_seqlen=reconstruct_seqlen,
            force=force,
            quiet=quiet,
        )
        report = run_depth(config)
    typer.echo(summary(report))
