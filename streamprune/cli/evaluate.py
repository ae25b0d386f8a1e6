"""`streamprune eval`: perplexity and zero-shot accuracy, streamed (library: evaluate)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UsageError
from ..evaluate import EvalConfig, evaluate, results_table, write_results
from ..outdir import check_destination
from .app import app
from .common import check_one_process, user_errors
from .options import (
    BatchTokens,
    DataDir,
    Device,
    Dtype,
    ExpertWeights,
    Limit,
    Model,
    OffloadDir,
    Output,
    Overlap,
    Ppl,
    Quiet,
    SEQLEN,
    Tasks,
)


@app.command(name="eval")
def eval_command(
    model: Model,
    ppl: Ppl = None,
    tasks: Tasks = None,
    data_dir: DataDir = None,
    seqlen: Annotated[int, SEQLEN] = 2048,
    limit: Limit = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    batch_tokens: BatchTokens = 8192,
    offload_dir: OffloadDir = None,
    expert_weights: ExpertWeights = "gpu",
    overlap: Overlap = True,
    output: Output = None,
    quiet: Quiet = False,
) -> None:
    """Measure perplexity and zero-shot accuracy without loading the model.

    Every evaluation token goes through layer 0, then all through layer 1, and so on; each layer is read once. Zero-shot tasks use lm-evaluation-harness prompts and report acc and acc_norm.
    """
    with user_errors(
        on_interrupt="interrupted",
        on_gpu_oom=f"Lower --batch-tokens (now {batch_tokens}) or use --device cpu.",
    ):
        check_one_process("eval")
        config = EvalConfig(
            model=model,
            ppl=None if ppl is None else str(ppl),
            tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else [],
            data_dir=None if data_dir is None else str(data_dir),
            seqlen=seqlen,
            limit=limit,
            device=device,
            dtype=dtype,
            batch_tokens=batch_tokens,
            offload_dir=None if offload_dir is None else str(offload_dir),
            expert_weights=expert_weights,
            overlap=overlap,
            quiet=quiet,
        )
        if output is not None:  # found out now, not after the evaluation
            if output.is_dir():
                raise UsageError(f"--output {output} is a directory; name a file, e.g. --output {output}/results.json")
            check_destination(output.expanduser().parent, "--output")
        results = evaluate(config)
        if output is not None:
            write_results(results, str(output))
    typer.echo(results_table(results))
