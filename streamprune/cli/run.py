"""`streamprune run`: prune a checkpoint layer by layer (library: pipeline.prune)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..config import PruneConfig, check_eval_text
from ..evaluate import EvalConfig, evaluate, results_table
from ..outdir import RECORD_FILE, write_json
from ..pipeline import prune
from .app import app
from .common import parse_batch_size, resume_command, summary, user_errors
from .options import (
    Allocation,
    BATCH_SIZE,
    Blocksize,
    CHECKPOINT_EVERY,
    CHECKPOINT_MINUTES,
    Calib,
    Device,
    Dtype,
    EvalPpl,
    EvalSeqlen,
    ExpertWeights,
    Force,
    MaxGpuMemory,
    MaxRam,
    MaxShardSize,
    Method,
    Model,
    Nsamples,
    Offload,
    OffloadDir,
    Out,
    Overlap,
    OwlLambda,
    OwlM,
    Pattern,
    Percdamp,
    Propagate,
    Quiet,
    Reconstruct,
    ReconstructBatchSize,
    ReconstructEpochs,
    ReconstructLr,
    ReconstructNorms,
    ReconstructOptimizer,
    SEQLEN,
    Seed,
    Sequential,
    Sparsity,
)


@app.command()
def run(
    model: Model,
    sparsity: Sparsity = None,
    pattern: Pattern = None,
    method: Method = "wanda",
    percdamp: Percdamp = None,
    blocksize: Blocksize = None,
    allocation: Allocation = "uniform",
    owl_m: OwlM = 5.0,
    owl_lambda: OwlLambda = 0.08,
    sequential: Sequential = False,
    calib: Calib = "c4",
    nsamples: Nsamples = 128,
    seqlen: Annotated[int, SEQLEN] = 2048,
    seed: Seed = 0,
    propagate: Propagate = "pruned",
    reconstruct: Reconstruct = False,
    reconstruct_epochs: ReconstructEpochs = 4,
    reconstruct_lr: ReconstructLr = 1e-3,
    reconstruct_batch_size: ReconstructBatchSize = 1,
    reconstruct_norms: ReconstructNorms = False,
    reconstruct_optimizer: ReconstructOptimizer = "adam",
    device: Device = "auto",
    dtype: Dtype = "auto",
    batch_size: Annotated[str, BATCH_SIZE] = "1",
    offload: Offload = "auto",
    offload_dir: OffloadDir = None,
    expert_weights: ExpertWeights = "auto",
    max_ram: MaxRam = None,
    max_gpu_memory: MaxGpuMemory = None,
    overlap: Overlap = True,
    checkpoint_every: Annotated[Optional[int], CHECKPOINT_EVERY] = None,
    checkpoint_minutes: Annotated[Optional[float], CHECKPOINT_MINUTES] = None,
    out: Out = ...,
    max_shard_size: MaxShardSize = "5GB",
    eval_ppl: EvalPpl = None,
    eval_seqlen: EvalSeqlen = 2048,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Prune MODEL (Wanda by default; see --method) and write a checkpoint that transformers loads as is.

    Layers are read one at a time from the safetensors shards, pruned and written straight to --out; the source is only ever read. Beside the checkpoint: streamprune.json (the run record) and streamprune_calibration.json (the exact calibration token ids).

    A run that is killed, interrupted (Ctrl-C) or stopped by a full disk resumes where it stopped when the same command is run again; its state lives in --out/.streamprune until it completes.
    """

    with user_errors(
        on_interrupt=f"interrupted; the work since the last saved layer is lost. To resume: {resume_command()}",
        on_gpu_oom=f"Lower --batch-size (now {batch_size}) or --seqlen, or set --max-gpu-memory below what this "
        "GPU has free (other processes may be using it), or use --device cpu. The work up to the last saved layer "
        f"is kept; resume with the same command: {resume_command()}",
        on_disk_full="The work up to the last saved layer is kept; free some space, then resume with: "
        + resume_command(),
    ):
        config = PruneConfig.from_flags(
            model=model,
            out=out,
            method=method,
            percdamp=percdamp,
            blocksize=blocksize,
            allocation=allocation,
            owl_m=owl_m,
            owl_lambda=owl_lambda,
            sparsity=sparsity,
            pattern=pattern,
            propagate=propagate,
            sequential=sequential,
            reconstruct=reconstruct,
            reconstruct_epochs=reconstruct_epochs,
            reconstruct_lr=reconstruct_lr,
            reconstruct_batch_size=reconstruct_batch_size,
            reconstruct_norms=reconstruct_norms,
            reconstruct_optimizer=reconstruct_optimizer,
            calib=calib,
            nsamples=nsamples,
            seqlen=seqlen,
            seed=seed,
            device=device,
            dtype=dtype,
            batch_size=parse_batch_size(batch_size),
            max_shard_size=max_shard_size,
            checkpoint_every=checkpoint_every,
            checkpoint_minutes=checkpoint_minutes,
            offload=offload,
            offload_dir=None if offload_dir is None else str(offload_dir),
            expert_weights=expert_weights,
            max_ram=max_ram,
            max_gpu_memory=max_gpu_memory,
            overlap=overlap,
            force=force,
            quiet=quiet,
        )
        check_eval_text(eval_ppl, eval_seqlen, "--eval-ppl", "--eval-seqlen")  # now, not after hours of pruning
        record = prune(config)
        if record is None:
            return  # one of several processes (torchrun): the leader reports
        if eval_ppl is not None:
            results = evaluate(
                EvalConfig(model=str(out), ppl=str(eval_ppl), seqlen=eval_seqlen, device=device, quiet=quiet)
            )
            record["evaluation"] = results
            write_json(out / RECORD_FILE, record)
    typer.echo(summary(record))
    if "evaluation" in record:
        typer.echo(results_table(record["evaluation"]))
