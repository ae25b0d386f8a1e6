"""`streamprune plan`: what a run (or a heal) will need, before it starts (library: plan.commands)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Annotated, Optional

import typer

from ..allocation import ALLOCATIONS, OWL_LAMBDA, OWL_M, check_owl
from ..config import (
    EXPERT_WEIGHTS,
    OFFLOAD,
    check_choice,
    check_positive,
    check_sparsity,
    keep_block,
    parse_limit,
)
from ..errors import EXIT_RESOURCES
from ..heal import BASES
from ..methods import METHODS, Target, method_named
from ..reconstruct import OPTIMIZERS, ReconstructSettings
from ..plan.commands import plan_heal, plan_model
from ..plan.evaluation import plan_eval
from .app import app
from .common import user_errors
from .options import (
    Allocation,
    AsJson,
    BATCH_SIZE,
    Base,
    BatchTokens,
    Blocksize,
    CHECKPOINT_EVERY,
    Device,
    Dtype,
    ExpertWeights,
    GradientCheckpointing,
    Heal,
    Limit,
    LoraRank,
    MaxGpuMemory,
    MaxRam,
    Method,
    Model,
    Nsamples,
    Offload,
    Optimizer,
    Overlap,
    Pattern,
    Percdamp,
    Ppl,
    Processes,
    ReadSpeed,
    Reconstruct,
    ReconstructBatchSize,
    ReconstructEpochs,
    ReconstructOptimizer,
    SEQLEN,
    Sequential,
    Sparsity,
    Steps,
    Tasks,
    WriteSpeed,
)


@app.command(name="plan")
def plan_command(
    model: Model,
    sparsity: Sparsity = None,
    pattern: Pattern = None,
    method: Method = "wanda",
    percdamp: Percdamp = None,
    blocksize: Blocksize = None,
    allocation: Allocation = "uniform",
    sequential: Sequential = False,
    nsamples: Nsamples = 128,
    seqlen: Annotated[Optional[int], SEQLEN] = None,
    tasks: Tasks = None,
    ppl: Ppl = None,
    limit: Limit = None,
    reconstruct: Reconstruct = False,
    reconstruct_epochs: ReconstructEpochs = 4,
    reconstruct_batch_size: ReconstructBatchSize = 1,
    reconstruct_optimizer: ReconstructOptimizer = "adam",
    heal: Heal = False,
    base: Base = "auto",
    lora_rank: LoraRank = 16,
    steps: Steps = 200,
    optimizer: Optimizer = "adam",
    device: Device = "auto",
    dtype: Dtype = "auto",
    batch_size: Annotated[Optional[int], BATCH_SIZE] = None,
    batch_tokens: BatchTokens = 8192,
    offload: Offload = "auto",
    expert_weights: ExpertWeights = "auto",
    max_ram: MaxRam = None,
    max_gpu_memory: MaxGpuMemory = None,
    overlap: Overlap = True,
    gradient_checkpointing: GradientCheckpointing = True,
    processes: Processes = 1,
    read_speed: ReadSpeed = "2GB",
    write_speed: WriteSpeed = None,
    checkpoint_every: Annotated[Optional[int], CHECKPOINT_EVERY] = None,
    as_json: AsJson = False,
) -> None:
    """What a run will need, from config.json alone, before you start it: memory, disk, time, and whether it fits.

    Peak RAM and GPU memory, disk, bytes read and written, FLOPs and a time estimate; if it does not fit, which flag would make it fit. MODEL may also be a config.json (only config.json is fetched). With --heal, the same for `streamprune heal`; --seqlen and --batch-size then default to heal's (512 and 4), else to run's (2048 and 1).

    With --tasks (the seven built-in ones, or rte) and/or --ppl FILE, the same for a streamed `streamprune eval` of them, the final norm and LM head included: its activation buffer holds every token of every task, and whether it needs --offload-dir.

    Examples: streamprune plan llama-70b --sparsity 0.5 --device rtx4090 --max-ram 32GB; streamprune plan qwen3-8b --heal --device rtx4090; streamprune plan llama-70b --device rtx4090 --tasks boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa
    """
    if tasks or ppl is not None:
        return plan_eval_command(model, tasks, ppl, limit, seqlen or 2048, dtype, device, batch_tokens, offload,
                                 max_ram, max_gpu_memory, overlap, read_speed, write_speed, as_json)  # fmt: skip
    if heal:
        return plan_heal_command(model, device, base, lora_rank, batch_size or 4, seqlen or 512, steps, optimizer,
                                 gradient_checkpointing, max_ram, max_gpu_memory, as_json)  # fmt: skip
    seqlen, batch_size = seqlen or 2048, batch_size or 1

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


def plan_eval_command(model, tasks, ppl, limit, seqlen, dtype, device, batch_tokens, offload, max_ram, max_gpu_memory,
                      overlap, read_speed, write_speed, as_json) -> None:  # fmt: skip
    with user_errors(on_interrupt="interrupted", on_gpu_oom="Use --device cpu."):
        check_choice("--offload", offload, OFFLOAD)
        counts = SimpleNamespace(seqlen=seqlen, batch_tokens=batch_tokens, limit=limit)
        check_positive(counts, "seqlen", "batch_tokens", "limit")
        names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
        text, numbers = plan_eval(
            model, names, ppl=None if ppl is None else str(ppl), limit=limit, seqlen=seqlen, dtype=dtype,
            device=device, batch_tokens=batch_tokens, offload=offload, max_ram=parse_limit("--max-ram", max_ram),
            max_gpu_memory=parse_limit("--max-gpu-memory", max_gpu_memory), overlap=overlap,
            read_bytes_per_second=parse_limit("--read-speed", read_speed),
            write_bytes_per_second=write_speed and parse_limit("--write-speed", write_speed),
        )  # fmt: skip
    typer.echo(json.dumps(numbers, indent=2) if as_json else text)
    if not numbers["fits"]:
        raise typer.Exit(EXIT_RESOURCES)
