"""The `streamprune` command: builds a PruneConfig from flags and calls the library."""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import typer

from .distributed import under_torchrun
from .errors import EXIT_INTERRUPTED, EXIT_RESOURCES, STOP_SIGNALS, StreamPruneError, UsageError
from .methods import methods_help
from .version import __version__

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    help="Prune large language models one decoder layer at a time, on the hardware you have.",
)


def print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"streamprune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", is_eager=True, callback=print_version
    ),
) -> None:
    """Prune large language models one decoder layer at a time, on the hardware you have."""


@app.command()
def run(
    model: str = typer.Argument(
        ...,
        help="A local checkpoint directory (config.json + safetensors), a hub id such as "
        "meta-llama/Llama-2-7b-hf, or an alias such as llama-70b, llama-3-8b, mistral-7b, qwen2-7b, smollm2-135m.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the pruned checkpoint."),
    sparsity: Optional[float] = typer.Option(
        None, help="Fraction of weights zeroed in every pruned Linear, in (0, 1). Default 0.5 when no --pattern."
    ),
    pattern: Optional[str] = typer.Option(
        None,
        help="N:M semi-structured sparsity: keep N of every M consecutive input weights in each row "
        "(2:4 keeps 2 of 4, NVIDIA's meaning). Replaces --sparsity.",
    ),
    method: str = typer.Option("wanda", help=f"Pruning method. {methods_help()}."),
    percdamp: Optional[float] = typer.Option(
        None, help="sparsegpt: dampening added to the Hessian's diagonal, as a fraction of its mean (default 0.01)."
    ),
    blocksize: Optional[int] = typer.Option(
        None, help="sparsegpt: columns pruned together before their error is spread to the rest (default 128)."
    ),
    allocation: str = typer.Option(
        "uniform",
        help="How much each layer loses: uniform (--sparsity everywhere) or owl (outlier-weighted, Yin et al. "
        "2024: a first pass over every layer measures its outliers; layers with more lose less, the mean stays "
        "--sparsity). owl takes --sparsity, not --pattern, and works with every method.",
    ),
    owl_m: float = typer.Option(5.0, help="owl: an outlier's Wanda score is above M x its layer's mean."),
    owl_lambda: float = typer.Option(0.08, help="owl: layer sparsities span at most 2 x lambda around --sparsity."),
    propagate: str = typer.Option(
        "pruned", help="Next block's calibration inputs come from the pruned block (pruned) or the dense one (dense)."
    ),
    sequential: bool = typer.Option(
        False,
        "--sequential",
        help="Inside each layer, prune q/k/v, then o_proj, then gate/up, then down_proj, each from statistics "
        "of the layer with the earlier ones already pruned (one forward per step; for methods with statistics).",
    ),
    reconstruct: bool = typer.Option(
        False,
        "--reconstruct",
        help="After pruning each layer, train its surviving weights (Adam, masked: every zero stays zero) so "
        "that its outputs on the pruned stream match the dense layer's on the dense stream (a second "
        "activation buffer). Costs about 3 x epochs more forwards per layer.",
    ),
    reconstruct_epochs: int = typer.Option(4, help="--reconstruct: passes over the calibration samples per layer."),
    reconstruct_lr: float = typer.Option(1e-3, help="--reconstruct: Adam's learning rate."),
    reconstruct_batch_size: int = typer.Option(1, help="--reconstruct: calibration samples per optimizer step."),
    reconstruct_norms: bool = typer.Option(False, "--reconstruct-norms", help="--reconstruct: train the norms too."),
    reconstruct_optimizer: str = typer.Option(
        "adam",
        help="--reconstruct: adam (torch, float32 moments) or adam8bit (bitsandbytes' 8-bit Adam: the moments "
        "take 2 bytes a weight instead of 8; `pip install bitsandbytes`).",
    ),
    calib: str = typer.Option(
        "c4",
        help='Calibration text: a .txt, .jsonl or .jsonl.gz file ("text" field per line), or c4 to fetch '
        "the Wanda paper's C4 shard from the hub.",
    ),
    nsamples: int = typer.Option(128, help="Number of calibration sequences."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration sequence (capped at max_position_embeddings)."),
    seed: int = typer.Option(0, help="Seed for choosing calibration windows."),
    device: str = typer.Option("auto", help="Compute device: auto (cuda if available), cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", help="Compute dtype: auto (the checkpoint's), float32, bfloat16, float16."),
    batch_size: str = typer.Option(
        "1",
        help="Calibration sequences per micro-batch, or auto (the most, up to 16, that fit --max-gpu-memory). "
        "1 reproduces the Wanda reference bit for bit; larger batches round differently, which can flip "
        "near-tied weights.",
    ),
    max_shard_size: str = typer.Option("5GB", help="Largest output shard file, e.g. 5GB, 500MB, 2GiB."),
    offload: str = typer.Option(
        "auto",
        help="Where the calibration activations (nsamples x seqlen x hidden; 4 GiB for a 70B model at 128 x "
        "2048 in bf16) live: cpu (RAM), disk (a memory-mapped file, for machines short of RAM), or auto "
        "(cpu when the plan fits the RAM, else disk).",
    ),
    offload_dir: Optional[Path] = typer.Option(
        None, help="Directory for --offload disk's file (default --out/.streamprune/offload); a fast disk helps."
    ),
    expert_weights: str = typer.Option(
        "auto",
        help="Mixture-of-experts models on a GPU: where each layer's routed experts live. gpu (the whole layer "
        "there), cpu (in RAM, each expert moved to the GPU only while it computes; its statistics and pruning on "
        "the CPU: for a layer larger than the GPU, slower), or auto (gpu when the plan fits --max-gpu-memory).",
    ),
    max_ram: Optional[str] = typer.Option(
        None, help="RAM the run may use, e.g. 16GB (default: what is available now). The plan is checked against it."
    ),
    max_gpu_memory: Optional[str] = typer.Option(
        None, help="GPU memory the run may use, e.g. 24GB (default: what is free on the device)."
    ),
    overlap: bool = typer.Option(
        True, "--overlap/--no-overlap", help="Read the next layer and write the last one while this one computes."
    ),
    checkpoint_every: Optional[int] = typer.Option(
        None,
        help="Save a resume point every K layers: the pruned shards so far, the activations entering the next "
        "layer (nsamples x seqlen x hidden, e.g. 4 GiB for a 70B model; only the latest is kept) and the run "
        "state. A killed run redoes at most K layers. Default: the smallest K whose activation files add at most "
        "20% to what the run writes (the plan shows it; every 12 layers for a 70B model at 128 x 2048).",
    ),
    checkpoint_minutes: Optional[float] = typer.Option(
        None, help="Also save a resume point whenever this many minutes have passed since the last one."
    ),
    eval_ppl: Optional[Path] = typer.Option(
        None, help="After pruning, measure the pruned model's perplexity on this text file (streamed, see eval)."
    ),
    eval_seqlen: int = typer.Option(2048, help="Window length for --eval-ppl (capped at max_position_embeddings)."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Write into a non-empty --out, replacing the checkpoint there, or discard an unfinished run "
        "there and start over.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Prune MODEL (Wanda by default; see --method) and write a checkpoint that transformers loads as is.

    Layers are read one at a time from the safetensors shards, pruned and written straight to
    --out; the source is only ever read. Beside the checkpoint: streamprune.json (the run record)
    and streamprune_calibration.json (the exact calibration token ids).

    A run that is killed, interrupted (Ctrl-C) or stopped by a full disk resumes where it stopped
    when the same command is run again; its state lives in --out/.streamprune until it completes.
    """
    from .config import PruneConfig
    from .pipeline import prune

    with user_errors(
        on_interrupt=f"interrupted; the work since the last saved layer is lost. To resume: {resume_command()}",
        on_gpu_oom=f"Lower --batch-size (now {batch_size}) or --seqlen, or set --max-gpu-memory below what this "
        "GPU has free (other processes may be using it), or use --device cpu. The work up to the last saved layer "
        f"is kept; resume with the same command: {resume_command()}",
        on_disk_full="The work up to the last saved layer is kept; free some space, then resume with: "
        + resume_command(),
    ):
        config = PruneConfig(
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
        if eval_ppl is not None and not eval_ppl.is_file():  # found out now, not after hours of pruning
            raise UsageError(f"--eval-ppl {eval_ppl}: no such file; pass a text file such as wiki.test.raw")
        record = prune(config)
        if record is None:
            return  # one of several processes (torchrun): the leader reports
        if eval_ppl is not None:
            from .evaluate import EvalConfig, evaluate
            from .outdir import RECORD_FILE, write_json

            results = evaluate(
                EvalConfig(model=str(out), ppl=str(eval_ppl), seqlen=eval_seqlen, device=device, quiet=quiet)
            )
            record["evaluation"] = results
            write_json(out / RECORD_FILE, record)
    typer.echo(summary(record))
    if "evaluation" in record:
        from .evaluate import results_table

        typer.echo(results_table(record["evaluation"]))


@app.command(name="plan")
def plan_command(
    model: str = typer.Argument(
        ..., help="A checkpoint directory, its config.json, a hub id or an alias (only config.json is fetched)."
    ),
    method: str = typer.Option("wanda", help=f"As for run. {methods_help()}."),
    percdamp: Optional[float] = typer.Option(None, help="sparsegpt's dampening, as for run (checked only)."),
    blocksize: Optional[int] = typer.Option(None, help="sparsegpt's column block, as for run."),
    allocation: str = typer.Option("uniform", help="uniform or owl, as for run (owl adds a pass over every layer)."),
    sequential: bool = typer.Option(False, "--sequential", help="As for run (three more forwards per layer)."),
    reconstruct: bool = typer.Option(False, "--reconstruct", help="As for run: a second buffer, training state."),
    reconstruct_epochs: int = typer.Option(4, help="As for run."),
    reconstruct_batch_size: int = typer.Option(1, help="As for run."),
    reconstruct_optimizer: str = typer.Option("adam", help="As for run: adam or adam8bit (a quarter of the moments)."),
    sparsity: Optional[float] = typer.Option(
        None, help="As for run (checked; how many weights are zeroed does not change memory or time)."
    ),
    pattern: Optional[str] = typer.Option(None, help="N:M, as for run."),
    nsamples: int = typer.Option(128, help="Calibration sequences, as for run."),
    seqlen: Optional[int] = typer.Option(
        None, help="Tokens per sequence, as for run (default 2048) or heal (default 512)."
    ),
    batch_size: Optional[int] = typer.Option(
        None, help="Sequences per micro-batch, as for run (default 1), or per step, as for heal (default 4)."
    ),
    dtype: str = typer.Option("auto", help="Compute dtype: auto (the config's), float32, bfloat16, float16."),
    device: str = typer.Option(
        "auto",
        help="auto (this machine's GPU, else its CPU), cpu, cuda, or a GPU to plan for: h200, h100, a100, l40s, "
        "rtx4090, rtx3090, a10.",
    ),
    offload: str = typer.Option("auto", help="cpu, disk or auto, as for run."),
    expert_weights: str = typer.Option("auto", help="Mixture-of-experts models: gpu, cpu or auto, as for run."),
    max_ram: Optional[str] = typer.Option(None, help="RAM limit to check, e.g. 16GB (default: available here)."),
    max_gpu_memory: Optional[str] = typer.Option(
        None, help="GPU memory limit to check, e.g. 24GB (default: the named GPU's, or what is free here)."
    ),
    checkpoint_every: Optional[int] = typer.Option(
        None, help="Resume point every K layers, as for run (each writes the buffer; default: within 20% more writes)."
    ),
    overlap: bool = typer.Option(True, "--overlap/--no-overlap", help="As for run."),
    processes: int = typer.Option(
        1, help="Plan a run of this many processes on one machine (torchrun --nproc-per-node N): per process "
        "and per machine memory, and the expected speed-up.",
    ),
    read_speed: str = typer.Option("2GB", help="Disk read speed per second assumed for the time estimate."),
    write_speed: Optional[str] = typer.Option(
        None, help="Disk write speed per second for the time estimate (default: probed by writing 256 MiB in the "
        "current directory; 1GB for a GPU named but not here)."
    ),
    heal: bool = typer.Option(
        False, "--heal", help="Plan `streamprune heal` (LoRA, the whole model in memory) instead of a run."
    ),
    base: str = typer.Option("auto", help="--heal: the frozen base, as for heal (nf4, int8, bf16, fp32)."),
    lora_rank: int = typer.Option(16, help="--heal: LoRA rank, as for heal."),
    steps: int = typer.Option(200, help="--heal: optimizer steps, as for heal."),
    optimizer: str = typer.Option("adam", help="--heal: adam or adam8bit, as for heal."),
    gradient_checkpointing: bool = typer.Option(
        True, "--gradient-checkpointing/--no-gradient-checkpointing", help="--heal: as for heal."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON instead of the report."),
) -> None:
    """What a run will need, from config.json alone, before you start it: peak RAM and GPU memory,
    disk, bytes read and written, FLOPs and a time estimate; whether it fits, and which flag would
    make it fit. Example: streamprune plan llama-70b --sparsity 0.5 --device rtx4090 --max-ram 32GB.
    With --heal, the same for `streamprune heal`: streamprune plan qwen3-8b --heal --device rtx4090"""
    if heal:
        return plan_heal_command(model, device, base, lora_rank, batch_size or 4, seqlen or 512, steps, optimizer,
                                 gradient_checkpointing, max_ram, max_gpu_memory, as_json)  # fmt: skip
    seqlen, batch_size = seqlen or 2048, batch_size or 1
    from types import SimpleNamespace

    from .allocation import ALLOCATIONS, OWL_LAMBDA, OWL_M, check_owl
    from .config import EXPERT_WEIGHTS, OFFLOAD, check_choice, check_positive, check_sparsity, keep_block, parse_limit
    from .methods import METHODS, Target, method_named
    from .plan import plan_model
    from .reconstruct import OPTIMIZERS, ReconstructSettings

    with user_errors(on_interrupt="interrupted", on_gpu_oom="Use --device cpu."):
        check_choice("--method", method, METHODS)
        sparsity = check_sparsity(sparsity, pattern)
        method_options = {"percdamp": percdamp, "blocksize": blocksize}
        method_named(method, **method_options).check_target(Target(sparsity, keep_block(pattern)))
        check_choice("--allocation", allocation, ALLOCATIONS)
        check_choice("--reconstruct-optimizer", reconstruct_optimizer, OPTIMIZERS)
        if allocation == "owl":
            check_owl(sparsity, pattern, OWL_M, OWL_LAMBDA)
        check_choice("--offload", offload, OFFLOAD)
        check_choice("--expert-weights", expert_weights, EXPERT_WEIGHTS)
        counts = SimpleNamespace(
            nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, checkpoint_every=checkpoint_every,
            processes=processes,
        )  # fmt: skip
        check_positive(counts, "nsamples", "seqlen", "batch_size", "checkpoint_every", "processes")
        text, numbers = plan_model(
            model,
            method=method,
            method_options=method_options,
            allocation=allocation,
            sequential=sequential,
            reconstruct=ReconstructSettings(
                epochs=reconstruct_epochs, batch_size=reconstruct_batch_size, optimizer=reconstruct_optimizer
            )
            if reconstruct
            else None,
            pattern=pattern,
            nsamples=nsamples,
            seqlen=seqlen,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            offload=offload,
            expert_weights=expert_weights,
            max_ram=parse_limit("--max-ram", max_ram),
            max_gpu_memory=parse_limit("--max-gpu-memory", max_gpu_memory),
            checkpoint_every=checkpoint_every,
            overlap=overlap,
            processes=processes,
            read_bytes_per_second=parse_limit("--read-speed", read_speed),
            write_bytes_per_second=write_speed and parse_limit("--write-speed", write_speed),
        )
    typer.echo(json.dumps(numbers, indent=2) if as_json else text)
    if not numbers["fits"]:
        raise typer.Exit(EXIT_RESOURCES)


def plan_heal_command(model, device, base, lora_rank, batch_size, seqlen, steps, optimizer, checkpointing, max_ram,
                      max_gpu_memory, as_json) -> None:  # fmt: skip
    from types import SimpleNamespace

    from .config import check_choice, check_positive, parse_limit
    from .heal import BASES
    from .plan import plan_heal
    from .reconstruct import OPTIMIZERS

    with user_errors(on_interrupt="interrupted", on_gpu_oom="Use --device cpu."):
        check_choice("--base", base, BASES)
        check_choice("--optimizer", optimizer, OPTIMIZERS)
        counts = SimpleNamespace(lora_rank=lora_rank, batch_size=batch_size, seqlen=seqlen, steps=steps)
        check_positive(counts, "lora_rank", "batch_size", "seqlen", "steps")
        text, numbers = plan_heal(
            model, device=device, base=base, rank=lora_rank, batch_size=batch_size, seqlen=seqlen, steps=steps,
            optimizer=optimizer, checkpointing=checkpointing, max_ram=parse_limit("--max-ram", max_ram),
            max_gpu_memory=parse_limit("--max-gpu-memory", max_gpu_memory),
        )  # fmt: skip
    typer.echo(json.dumps(numbers, indent=2) if as_json else text)
    if not numbers["fits"]:
        raise typer.Exit(EXIT_RESOURCES)


@app.command(name="eval")
def eval_command(
    model: str = typer.Argument(..., help="A checkpoint directory, hub id or alias, as for run."),
    ppl: Optional[Path] = typer.Option(
        None,
        help="Text file (e.g. WikiText-2's wiki.test.raw) for perplexity: tokenized whole, cut into "
        "non-overlapping windows of --seqlen tokens.",
    ),
    tasks: Optional[str] = typer.Option(
        None,
        help="Comma-separated zero-shot tasks: arc_easy, arc_challenge, piqa, boolq, winogrande, hellaswag, "
        "openbookqa (lm-evaluation-harness prompts; acc and acc_norm).",
    ),
    data_dir: Optional[Path] = typer.Option(None, help="Directory of the task files (zeroshot layout)."),
    seqlen: int = typer.Option(2048, help="Perplexity window and longest zero-shot sequence (capped at the model's)."),
    limit: Optional[int] = typer.Option(None, help="At most N examples per task and N perplexity windows."),
    device: str = typer.Option("auto", help="Compute device: auto (cuda if available), cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", help="Compute dtype: auto (the checkpoint's), float32, bfloat16, float16."),
    batch_tokens: int = typer.Option(8192, help="Tokens per micro-batch on the device (padding included)."),
    offload_dir: Optional[Path] = typer.Option(
        None, help="Keep the activation buffer (tokens x hidden) in a temporary file here instead of RAM."
    ),
    output: Optional[Path] = typer.Option(None, help="Write the results (with per-example predictions) as JSON."),
    expert_weights: str = typer.Option(
        "gpu", help="Mixture-of-experts models on a GPU: gpu, or cpu (each expert in RAM, moved to the GPU only "
        "while it computes) for a layer larger than the GPU, as for run. Same results either way."
    ),
    overlap: bool = typer.Option(
        True, "--overlap/--no-overlap", help="Read the next layer while this one computes."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Measure perplexity and zero-shot accuracy without loading the model: every evaluation token
    goes through layer 0, then all through layer 1, and so on; each layer is read once."""
    from .evaluate import EvalConfig, evaluate, results_table, write_results
    from .outdir import check_destination

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


@app.command()
def depth(
    model: str = typer.Argument(..., help="A checkpoint directory, hub id or alias, as for run."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: the shortened checkpoint and the scores."),
    remove: Optional[int] = typer.Option(None, help="Number of decoder blocks to remove."),
    ratio: Optional[float] = typer.Option(
        None, help="Fraction of all blocks to remove (rounded), instead of --remove."
    ),
    criterion: str = typer.Option(
        "ppl",
        help="Block score: ppl (calibration perplexity with the block skipped), taylor (sum |W * dL/dW|), "
        "magnitude (sum |W|, no data), bi (1 - cos(block input, output)). Lowest scores are removed.",
    ),
    scores_only: bool = typer.Option(False, "--scores-only", help="Score and report; write no checkpoint."),
    keep_first: int = typer.Option(4, help="Never remove the first N blocks (the paper's default 4)."),
    keep_last: int = typer.Option(2, help="Never remove the last N blocks (the paper's default 2)."),
    iterative: bool = typer.Option(False, "--iterative", help="Remove one block at a time, rescoring each time."),
    calib: str = typer.Option("c4", help="Calibration text, as for run (not used by magnitude)."),
    nsamples: int = typer.Option(10, help="Calibration sequences (the paper: 10)."),
    seqlen: int = typer.Option(128, help="Tokens per calibration sequence (the paper: 128)."),
    seed: int = typer.Option(1234, help="Seed for picking calibration windows (the paper: 1234)."),
    batch_size: int = typer.Option(1, help="Calibration sequences per micro-batch on the device."),
    max_streams: Optional[int] = typer.Option(
        None, help="ppl: skip streams per pass over the weights (default: as many as fit in half the free RAM)."
    ),
    device: str = typer.Option("auto", help="Compute device: auto (cuda if available), cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", help="Compute dtype: auto (the checkpoint's), float32, bfloat16, float16."),
    max_shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 5GB, 500MB."),
    checkpoint_minutes: float = typer.Option(
        5.0,
        help="Save the scoring's progress in --out this often (0: after every block); a stopped run, "
        "run again with the same command, goes on from the last save.",
    ),
    overlap: bool = typer.Option(
        True, "--overlap/--no-overlap", help="Read the next block while this one computes."
    ),
    reconstruct: bool = typer.Option(
        False,
        "--reconstruct",
        help="Heal each seam: the block before a removed span is trained (Adam, all its Linears) so that, on the "
        "shortened model's inputs, it produces what the span produced in the dense model. One more pass over "
        "the blocks, on --reconstruct-nsamples x --reconstruct-seqlen tokens of --calib.",
    ),
    reconstruct_epochs: int = typer.Option(4, help="--reconstruct: passes over the samples per seam block."),
    reconstruct_lr: float = typer.Option(1e-3, help="--reconstruct: Adam's learning rate."),
    reconstruct_batch_size: int = typer.Option(1, help="--reconstruct: samples per optimizer step."),
    reconstruct_optimizer: str = typer.Option("adam", help="--reconstruct: adam or adam8bit, as for run."),
    reconstruct_nsamples: int = typer.Option(32, help="--reconstruct: calibration sequences to train on."),
    reconstruct_seqlen: int = typer.Option(512, help="--reconstruct: tokens per training sequence."),
    force: bool = typer.Option(False, "--force", help="Replace the checkpoint in a non-empty --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Depth pruning (Shortened LLaMA): score every decoder block, remove the lowest-scoring whole
    blocks, and write a shorter checkpoint (blocks renumbered, config.json made consistent).

    Beside it: depth_scores.json and .csv (a score per block) and depth_scores.png (a bar chart,
    removed blocks marked). Unlike 50% sparsity, fewer blocks make batch-1 generation faster on every
    runtime.
    """
    from .depth import DepthConfig, summary
    from .depth import depth as run_depth

    with user_errors(
        on_interrupt="interrupted; no loadable checkpoint was left in --out. The scoring's last save (every "
        f"--checkpoint-minutes) and finished block scores are reused: run again to go on: {resume_command()}",
        on_gpu_oom=f"Lower --batch-size (now {batch_size}) or use --device cpu.",
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


@app.command()
def heal(
    model: str = typer.Argument(..., help="The pruned model to heal: a local directory, a hub id or an alias."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the healed checkpoint."),
    data: str = typer.Option("c4", help="Training text: c4 (the shard run calibrates on) or a local .jsonl[.gz]/.txt file."),
    steps: int = typer.Option(200, help="Optimizer steps."),
    batch_size: int = typer.Option(4, help="Sequences per optimizer step."),
    seqlen: int = typer.Option(512, help="Tokens per training sequence (capped at max_position_embeddings)."),
    lr: float = typer.Option(2e-4, help="Peak learning rate (linear warmup over 5% of the steps, then cosine to 0)."),
    lora_rank: int = typer.Option(16, help="LoRA rank r of every adapter."),
    lora_alpha: float = typer.Option(32.0, help="LoRA alpha: the delta is scaled by alpha / r."),
    base: str = typer.Option(
        "auto",
        help="The frozen base in memory: nf4 (QLoRA, bitsandbytes 4-bit), int8 (bitsandbytes LLM.int8), bf16 or "
        "fp32; auto: nf4 on a GPU, fp32 on a CPU. The output is always the source's dtype.",
    ),
    optimizer: str = typer.Option("adam", help="adam, or adam8bit (bitsandbytes: a quarter of the moments' memory)."),
    seed: int = typer.Option(0, help="Seed for the training windows and the adapters' initial values."),
    device: str = typer.Option("auto", help="Compute device: auto (cuda if available), cpu, cuda, cuda:N."),
    checkpoint_every: int = typer.Option(
        50, help="Save the adapters, optimizer and step in --out every N steps; the same command resumes there."
    ),
    gradient_checkpointing: bool = typer.Option(
        True, "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute each block's activations in the backward pass: far less memory, ~30% more time.",
    ),  # fmt: skip
    max_shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 5GB, 500MB."),
    eval_ppl: Optional[Path] = typer.Option(None, help="After healing, perplexity of the output on this text file."),
    eval_seqlen: int = typer.Option(512, help="Window length for --eval-ppl."),
    force: bool = typer.Option(False, "--force", help="Start over in a non-empty --out (an unfinished heal is discarded)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Heal a pruned model with LoRA (QLoRA with --base nf4) and write the merged checkpoint.

    The whole model is held in memory (see `streamprune plan MODEL --heal`); for models that do not
    fit, heal layer by layer with `streamprune run ... --reconstruct`. Every weight that is zero in
    MODEL is still exactly zero in the output: each adapter's delta acts through its Linear's mask,
    in training and in the merge. Beside the checkpoint: adapter/ (peft) and streamprune.json.
    """
    from .heal import HealConfig, summary
    from .heal import heal as run_heal

    with user_errors(
        on_interrupt=f"interrupted; the adapters and optimizer saved every --checkpoint-every steps are kept in "
        f"--out. To resume: {resume_command()}",
        on_gpu_oom=f"Lower --batch-size (now {batch_size}) or --seqlen, or use --base nf4. Resume with the same "
        "command after changing nothing else, or start over with --force.",
        on_disk_full=f"The training state saved so far is kept; free some space, then: {resume_command()}",
    ):
        check_one_process("heal")
        config = HealConfig(
            model=model, out=out, data=data, steps=steps, batch_size=batch_size, seqlen=seqlen, lr=lr,
            lora_rank=lora_rank, lora_alpha=lora_alpha, base=base, optimizer=optimizer, seed=seed, device=device,
            checkpoint_every=checkpoint_every, gradient_checkpointing=gradient_checkpointing,
            max_shard_size=max_shard_size, eval_ppl=eval_ppl, eval_seqlen=eval_seqlen, force=force, quiet=quiet,
        )  # fmt: skip
        record = run_heal(config)
    typer.echo(summary(record))


@contextmanager
def user_errors(on_interrupt: str, on_gpu_oom: str, on_disk_full: str | None = None):
    """What the user can act on becomes a message and its exit code (README); anything else is a
    bug and keeps its traceback. A full disk is handled only where the command says what is kept.
    SIGTERM and SIGHUP stop the command as Ctrl-C does (run's layer loop finishes its layer first)."""
    try:
        with stop_signals_as_ctrl_c():
            yield
    except StreamPruneError as err:
        say(f"error: {err}")
        if err.exit_code == EXIT_INTERRUPTED:
            say(f"to resume: {resume_command()}")
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        say(f"\n{on_interrupt}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except torch.OutOfMemoryError:
        say(f"error: out of GPU memory. {on_gpu_oom}")
        raise typer.Exit(EXIT_RESOURCES) from None
    except OSError as err:
        if err.errno != errno.ENOSPC or on_disk_full is None:
            raise
        say(f"error: the disk is full ({err.filename or 'the output directory'}). {on_disk_full}")
        raise typer.Exit(EXIT_RESOURCES) from None


@contextmanager
def stop_signals_as_ctrl_c():
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, while the command runs."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signum != signal.SIGINT:
                previous[signum] = signal.signal(signum, signal.default_int_handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_one_process(command: str) -> None:
    """Refuse a command that runs in one process when torchrun started several: each would do the
    whole work and write the same files."""
    if under_torchrun():
        raise UsageError(
            f"streamprune {command} runs in one process (only run shares its work between processes): "
            f"start it without torchrun: streamprune {command} ..."
        )


def say(message: str) -> None:
    """A message on stderr; after SIGHUP the terminal may be gone, which must not hide the exit code."""
    if under_torchrun():  # which process says it
        message = f"[process {os.environ.get('RANK', '?')}] {message.lstrip()}"
    try:
        typer.echo(message, err=True)
    except OSError:
        pass


def parse_batch_size(text: str) -> int | None:
    """--batch-size: a positive count, or auto (None: sized from the plan)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--batch-size {text!r} is neither a number nor auto; e.g. --batch-size 1") from None


def resume_command() -> str:
    if under_torchrun():  # any process count resumes it
        processes = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        return shlex.join(["torchrun", f"--nproc-per-node={processes}", "-m", "streamprune", *sys.argv[1:]])
    return shlex.join(["streamprune", *sys.argv[1:]])


def summary(record: dict) -> str:
    gib = 1024**3
    lines = [
        f"pruned {record['source']['num_hidden_layers']} layers of {record['source']['model']} "
        f"({record['arguments']['method']}, target sparsity {record['target_sparsity']:.3f}, "
        f"achieved {record['mean_layer_sparsity']:.3f}) in {record['total_seconds']:.1f} s on {record['device']}"
        + (f" x {record['processes']} processes" if record.get("processes", 1) > 1 else ""),
        f"peak RSS {record['peak_rss_bytes'] / gib:.2f} GiB (planned {record['plan']['peak_ram_bytes'] / gib:.2f})"
        + (
            f", peak VRAM {record['peak_vram_bytes'] / gib:.2f} GiB "
            f"(planned {record['plan']['peak_vram_bytes'] / gib:.2f})"
            if record["peak_vram_bytes"]
            else ""
        ),
        *(
            [f"resumed {len(record['sessions']) - 1} time(s), last from layer {record['sessions'][-1]['from_layer']}"]
            if len(record["sessions"]) > 1
            else []
        ),
        f"wrote {record['arguments']['out']} ({len(record['output_files'])} shards); run record: streamprune.json",
    ]
    return "\n".join(lines)
