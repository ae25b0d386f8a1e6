"""What `streamprune plan` runs: the device's name, rates and limits (plan_device), the run's plan
and report (plan_model), and `--heal`'s, the whole model in memory (plan_heal)."""

from __future__ import annotations

import torch

from ..buffers import available_ram_bytes
from ..checkpoint import FLOAT_DTYPES as DTYPES
from ..config import check_dtype
from ..errors import UsageError
from ..families import family_of
from ..heal import NOT_MOE, compute_dtype, resolve_base
from ..sizes import format_size
from ..source import fetch_config
from .geometry import Geometry
from .memory import Settings, current_rss_bytes, default_limits, estimate, fit, shared
from .probes import (
    GPU_MEMORY_GB,
    GPU_PEAK_TFLOPS,
    assumed_rates,
    disk_write_bytes_per_second,
    local_rates,
    probe_directory,
)
from .report import duration, report, seconds


def plan_device(device: str, compute: torch.dtype, max_gpu_memory: int | None, config: dict,
                forward_shape: tuple[int, int] | None = None) -> tuple:  # fmt: skip
    """(name, rates or None, "cpu" or "cuda", GPU memory limit) for `plan --device`: auto, cpu or
    cuda[:N] (this machine's: its rates probed, see probe_rates, on the run's [batch_size, seqlen]
    `forward_shape`) or a GPU named in GPU_PEAK_TFLOPS (its rates assumed from the peak)."""
    named = device.lower().replace("-", "")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if named in GPU_PEAK_TFLOPS:
        return device, assumed_rates(named), "cuda", max_gpu_memory or GPU_MEMORY_GB[named] * 10**9
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: torch sees no GPU here; name one instead, e.g. --device rtx4090")
        name = torch.cuda.get_device_name(torch.device(device))
        limit = max_gpu_memory or default_limits(0, torch.device(device))[1]
        return name, local_rates(config, compute, torch.device(device), limit, forward_shape), "cuda", limit
    if device == "cpu":
        rates = local_rates(config, compute, torch.device("cpu"), available_ram_bytes())
        return "this CPU (probed)", rates, "cpu", max_gpu_memory
    raise UsageError(f"--device {device!r}: use auto, cpu, cuda, or one of {', '.join(GPU_PEAK_TFLOPS)}")


def plan_model(
    model: str,
    dtype: str = "auto",
    device: str = "auto",
    max_ram: int | None = None,
    max_gpu_memory: int | None = None,
    read_bytes_per_second: float = 2e9,
    write_bytes_per_second: float | None = None,
    processes: int = 1,
    **run_settings,
) -> tuple[str, dict]:
    """`streamprune plan`: the report and the numbers for MODEL (a directory, hub id or alias;
    only its config.json is read). `device` is auto, cpu, cuda or a GPU name from GPU_PEAK_TFLOPS;
    `run_settings` are the run's own Settings fields (method, pattern, nsamples, seqlen, ...).
    `write_bytes_per_second` None: probed (probe_directory) where the plan probes its device (1 GB/s
    assumed for a GPU named but not here)."""
    check_dtype(dtype)
    config, where = fetch_config(model)
    family = family_of(config)
    # the run's heavy imports, so that the runtime measured below is the run's; here, not at the top,
    # as importing the plan must not load them
    family.classes()
    import transformers.models.auto.tokenization_auto  # noqa: F401

    geometry = Geometry.from_config(config)
    stored = DTYPES.get(config.get("torch_dtype") or config.get("dtype") or "float32", torch.float32)
    compute = stored if dtype == "auto" else DTYPES[dtype]
    seqlen = run_settings.pop("seqlen", Settings.seqlen)
    seqlen = min(seqlen, config.get("max_position_embeddings") or seqlen)
    forward_shape = (run_settings.get("batch_size") or Settings.batch_size, seqlen)
    device_name, rates, kind, max_gpu_memory = plan_device(device, compute, max_gpu_memory, config, forward_shape)
    settings = Settings(**run_settings, seqlen=seqlen, stored_bytes=stored.itemsize, compute_bytes=compute.itemsize,
                        device=kind, runtime_bytes=current_rss_bytes())  # fmt: skip
    if max_ram is None:
        max_ram = default_limits(settings.runtime_bytes, None)[0]
    if processes > 1:
        alone = estimate(geometry, settings)
        plan, problems = shared(geometry, settings, processes, max_ram, max_gpu_memory)
    else:
        plan, problems = fit(geometry, settings, max_ram, max_gpu_memory)
    here = device.lower().replace("-", "") not in GPU_PEAK_TFLOPS  # this machine's device, probed
    probed = None
    if write_bytes_per_second is None and rates is not None and here:
        probed = disk_write_bytes_per_second(probe_directory(model))
    write_probed = probed is not None
    write_bytes_per_second = write_bytes_per_second or probed or 1e9
    times = None
    if rates is not None:
        io = read_bytes_per_second, write_bytes_per_second, settings.overlap and kind == "cuda"
        # processes on one CPU share its cores (torchrun gives each one thread): each computes at
        # its share of the probed rates; on GPUs each has its own
        times = seconds(plan, {k: r / processes for k, r in rates.items()} if kind == "cpu" else rates, *io)
        if processes > 1:
            times["speed_up"] = seconds(alone, rates, *io)["total"] / times["total"]
    head = (
        f"{model}: {config.get('architectures', ['?'])[0]}, {geometry.layers} layers, hidden {geometry.hidden}, "
        f"stored {str(stored).removeprefix('torch.')}, compute {str(compute).removeprefix('torch.')} "
        f"(config from {where})\nlimits: RAM {format_size(max_ram) if max_ram else 'unknown'}"
        + (f", GPU memory {format_size(max_gpu_memory)}" if kind == "cuda" else "")
        + f"; disk read {read_bytes_per_second / 1e9:g} GB/s (assumed), write {write_bytes_per_second / 1e9:.2g} GB/s "
        + ("(probed here)" if write_probed else "(assumed)")
    )
    text = head + "\n" + report(plan, settings, times, device_name, problems)
    numbers = {
        **plan,
        "settings": {**settings.__dict__, "reconstruct": settings.reconstruct and settings.reconstruct.as_record()},
        "limits": {"ram_bytes": max_ram, "gpu_bytes": max_gpu_memory},
        "seconds": times,
        "device": device_name,
        "fits": not problems,
        "problems": problems,
    }
    return text, numbers


# -- streamprune heal: the whole model in memory -----------------------------------------------------------

# bytes a projection weight takes as heal's frozen base: NF4 is 4 bits plus a float32 absmax per
# block of 64 (bitsandbytes' default blocks), int8 one byte plus a float32 absmax per row
BASE_BYTES_PER_WEIGHT = {"nf4": 0.5 + 4 / 64, "int8": 1.0, "bf16": 2.0, "fp32": 4.0}
HEAL_OPTIMIZER_BYTES = {"adam": 16, "adam8bit": 10}  # an adapter weight: value, gradient, two moments


def heal_memory(g: Geometry, base: str, compute_bytes: int, rank: int, batch: int, seqlen: int, optimizer: str,
                checkpointing: bool) -> dict[str, int]:  # fmt: skip
    """Peak bytes of `streamprune heal` on its device, by part."""
    tokens = batch * seqlen
    adapter_params = g.layers * sum(rank * (rows + cols) for rows, cols in g.linear_shapes().values())
    # one block's autograd state a token, in the compute dtype: the norms' inputs and scaled outputs,
    # the rotated q and k, attention's inputs and output, the MLP's gate, up, activation and product;
    # fitted to heal's measured peaks on SmolLM2 without checkpointing (README, Status), ~2x a bare count
    block_activations = tokens * (12 * g.hidden + 8 * g.intermediate + 2 * (g.heads + 2 * g.kv_heads) * g.head_dim)
    block_activations *= compute_bytes
    # a block's weights as computed, kept for backward: base dequantized plus masked delta (float32)
    # and the unpacked keep-mask (1 byte a weight)
    block_weights = g.linear_params * (4 + 1)
    return {
        "frozen base": int(g.layers * g.linear_params * BASE_BYTES_PER_WEIGHT[base]),
        "masks": g.layers * g.linear_params // 8,
        "embeddings, norms, head": (g.outside_params + g.layers * 2 * g.hidden) * compute_bytes,
        "adapters and optimizer": adapter_params * HEAL_OPTIMIZER_BYTES[optimizer],
        # with checkpointing each block keeps only its input; one block at a time is recomputed
        "activations": (g.layers * tokens * g.hidden * compute_bytes + block_activations) if checkpointing
        else g.layers * block_activations,
        "block weights": block_weights if checkpointing else g.layers * block_weights,
        "logits": 3 * tokens * g.vocab * 4,  # float32 logits, their log-softmax and its gradient
    }


def heal_flops(g: Geometry, tokens: int, checkpointing: bool) -> float:
    """One optimizer step: forward (twice with checkpointing), the input gradient through every
    Linear and the head, and each masked delta's full [out, in] gradient."""
    linears, head = 2 * tokens * g.layers * g.linear_params, 2 * tokens * g.vocab * g.hidden
    return linears * (3 + (1 if checkpointing else 0)) + 2 * head


def plan_heal(model: str, device: str = "auto", base: str = "auto", rank: int = 16, batch_size: int = 4,
              seqlen: int = 512, steps: int = 200, optimizer: str = "adam", checkpointing: bool = True,
              max_ram: int | None = None, max_gpu_memory: int | None = None) -> tuple[str, dict]:  # fmt: skip
    """`streamprune plan MODEL --heal`: whether LoRA healing fits, and how long it takes."""
    config, where = fetch_config(model)
    family = family_of(config)
    if family.experts is not None:
        raise UsageError(f"{model} is a mixture-of-experts model ({family.architecture}); {NOT_MOE}")
    # heal's heavy imports, so that the runtime measured below is heal's; here, not at the top, as
    # importing the plan must not load them
    family.classes()
    import peft  # noqa: F401
    import transformers.models.auto.tokenization_auto  # noqa: F401

    g = Geometry.from_config(config)
    seqlen = min(seqlen, config.get("max_position_embeddings") or seqlen)
    device_name, rates, kind, max_gpu_memory = plan_device(device, torch.float32, max_gpu_memory, config)
    base = resolve_base(base, kind)
    compute_bytes = compute_dtype(base, kind).itemsize
    parts = heal_memory(g, base, compute_bytes, rank, batch_size, seqlen, optimizer, checkpointing)
    peak = sum(parts.values())
    runtime = current_rss_bytes()
    limit = max_gpu_memory if kind == "cuda" else (max_ram or default_limits(runtime, None)[0])
    needed = peak if kind == "cuda" else peak + runtime
    problems = []
    if limit is not None and needed > limit:
        problems.append(
            f"heal needs {format_size(needed)} on the {'GPU' if kind == 'cuda' else 'CPU'}, which has "
            f"{format_size(limit)}"
            + (f"; the frozen base alone is {format_size(parts['frozen base'])}" if parts["frozen base"] > limit / 2 else "")
            + ". Heal layer by layer instead, one block in memory at a time: streamprune run MODEL --reconstruct "
            "(plan it with: streamprune plan MODEL --reconstruct)"
            + ("" if base == "nf4" else ", or try --base nf4")
        )
    step_flops = heal_flops(g, batch_size * seqlen, checkpointing)
    total_seconds = steps * step_flops / rates["forward"] if rates else None
    lines = [
        f"{model}: {config.get('architectures', ['?'])[0]}, {g.layers} layers (config from {where})",
        f"heal plan: LoRA rank {rank} on {len(g.linear_shapes()) * g.layers} Linears ({format_size(parts['adapters and optimizer'])} "
        f"with {optimizer}), base {base}, {batch_size} x {seqlen} tokens a step, gradient checkpointing "
        f"{'on' if checkpointing else 'off'}",
        f"  peak {'VRAM' if kind == 'cuda' else 'RAM '} {format_size(needed)} ("
        + ", ".join(f"{name} {format_size(n)}" for name, n in parts.items())
        + (f", runtime {format_size(runtime)}" if kind == "cpu" else "") + ")",
        f"  compute    {steps * step_flops / 1e12:,.1f} TFLOP for {steps} steps"
        + (f", ~{duration(total_seconds)} on {device_name}" if total_seconds else ""),
        *([f"  does not fit: {p}" for p in problems] or ["  fits the limits"]),
    ]
    numbers = {"parts": parts, "peak_bytes": needed, "limit_bytes": limit, "device": device_name, "base": base,
               "flops": steps * step_flops, "seconds": total_seconds, "fits": not problems, "problems": problems}  # fmt: skip
    return "\n".join(lines), numbers
