"""`streamprune eval`: perplexity and zero-shot accuracy, streamed (library: evaluate; harness tasks: harness)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from ..evaluate import EvalConfig, evaluate, results_table, write_results
from ..outdir import check_destination, check_not_source
from .app import app
from .common import check_one_process, user_errors
from .options import (
    BatchTokens,
    DataDir,
    Device,
    Dtype,
    ExpertWeights,
    IncludePath,
    Limit,
    Model,
    NumFewshot,
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
    include_path: IncludePath = None,
    num_fewshot: NumFewshot = None,
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

    Every evaluation token goes through layer 0, then all through layer 1, and so on; each layer is read once.

    --tasks with --data-dir: the seven built-in offline tasks, with lm-evaluation-harness prompts (acc, acc_norm).

    --tasks without --data-dir: any lm-evaluation-harness task (and those in --include-path), scored by the harness through the streamed `streamprune` backend; needs lm-eval, the eval extra of streamprune.
    """
    with user_errors(
        on_interrupt="interrupted",
        on_gpu_oom=f"Lower --batch-tokens (now {batch_tokens}) or use --device cpu.",
    ):
        check_one_process("eval")
        names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []
        harness_tasks = harness_path(names, data_dir, include_path, num_fewshot)
        config = None
        if ppl is not None or not harness_tasks:  # EvalConfig refuses a run with neither --ppl nor built-in tasks
            config = EvalConfig(
                model=model,
                ppl=None if ppl is None else str(ppl),
                tasks=[] if harness_tasks else names,
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
            check_output(output, model, {"--ppl": ppl, "--data-dir": data_dir, "--include-path": include_path})
        results = evaluate(config) if config is not None else {}
        table = results_table(results) if results else ""
        if harness_tasks:
            from ..harness import StreamedLM, run_tasks
            from ..harness import results_table as harness_table

            lm = StreamedLM(model, device=device, dtype=dtype, batch_tokens=batch_tokens,
                            offload_dir=None if offload_dir is None else str(offload_dir),
                            expert_weights=expert_weights, overlap=overlap, quiet=quiet)  # fmt: skip
            scored = run_tasks(lm, harness_tasks, None if include_path is None else str(include_path), num_fewshot,
                               limit)  # fmt: skip
            results.update(model=model, backend="lm-evaluation-harness (streamprune)", **scored)
            table = "\n".join(t for t in (table, harness_table(scored)) if t)
        if output is not None:
            write_results(results, str(output))
    typer.echo(table)


def harness_path(tasks: list[str], data_dir, include_path, num_fewshot) -> list[str]:
    """The tasks lm-evaluation-harness is to run (none when --data-dir picks the built-in ones),
    refusing harness-only flags on the built-in path and a harness path without lm-eval."""
    if not tasks or data_dir is not None:
        if include_path is not None or num_fewshot is not None:
            raise UsageError(
                "--include-path and --num-fewshot apply to lm-evaluation-harness tasks, which run when --tasks is "
                "given without --data-dir; drop them, or drop --data-dir"
            )
        return []
    if num_fewshot is not None and num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError(
            "--tasks without --data-dir runs lm-evaluation-harness tasks, and lm-eval is not installed: "
            "pip install 'streamprune[eval]'; or add --data-dir DIR (a data folder, see docs/data.md) for the built-in "
            "offline tasks (arc_easy, arc_challenge, piqa, boolq, winogrande, hellaswag, openbookqa)"
        )
    return tasks


def check_output(output: Path, model: str, inputs: dict[str, Path | None]) -> None:
    """--output names a new or replaceable file outside the source and outside every input: eval never
    writes into the model it reads nor over its text."""
    if output.is_dir():
        raise UsageError(f"--output {output} is a directory; name a file, e.g. --output {output}/results.json")
    if Path(model).expanduser().is_dir():
        check_not_source(output.expanduser(), Path(model).expanduser(), "--output")
    written = output.expanduser().resolve()
    for flag, given in inputs.items():
        if given is None:
            continue
        read = given.expanduser().resolve()
        if written == read or read in written.parents:
            raise UsageError(
                f"--output {output} would write over {flag} {given}, which this command reads; name another file, "
                "e.g. --output results.json"
            )
    check_destination(output.expanduser().parent, "--output")
