"""A device's rates, probed here (a decoder layer's forward, matmuls, the passes over each pruned
weight, SparseGPT's column steps, the disk's writes) or assumed from a GPU's data sheet."""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import torch

from ..families import LayerRunner, family_of
from ..methods.base import Target
from ..methods.masks import apply_mask, row_prune_mask, zero_count
from ..methods.sparsegpt import obs_prune
from ..methods.wanda import wanda_scores
from ..stream import nonfinite_counts
from .geometry import Geometry

# Dense bf16 tensor-core peaks (vendor datasheets, TFLOP/s); a run reaches a fraction of this.
GPU_PEAK_TFLOPS = {"h200": 989, "h100": 989, "a100": 312, "l40s": 362, "rtx4090": 165, "rtx3090": 71, "a10": 125}
GPU_EFFICIENCY = 0.4  # fraction of peak that batch-1 layer forwards typically reach
# float32 peaks without tensor cores (statistics such as SparseGPT's Hessians, and its solve), data
# sheets; large square float32 matmuls reach more of theirs than a layer's forward of its peak
GPU_FLOAT32_TFLOPS = {"h200": 67, "h100": 67, "a100": 19.5, "l40s": 91.6, "rtx4090": 82.6, "rtx3090": 35.6, "a10": 31.2}
GPU_FLOAT32_EFFICIENCY = 0.75
GPU_MEMORY_GB = {"h200": 141, "h100": 80, "a100": 80, "l40s": 48, "rtx4090": 24, "rtx3090": 24, "a10": 24}


PROBE_WRITE_BYTES = 256 * 2**20  # fsynced: a smaller file can land in the disk's own cache


def disk_write_bytes_per_second(directory: Path) -> float | None:
    """Bytes per second written and fsynced to a file in `directory` (deleted after), as the writer
    does its shards; None where the directory cannot be written. Probed, not assumed: disks differ
    by several times, and the writes can be much of a run's time."""
    chunk = bytes(8 * 2**20)
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".streamprune-probe-") as file:
            started = time.perf_counter()
            for _ in range(PROBE_WRITE_BYTES // len(chunk)):
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
            return PROBE_WRITE_BYTES / (time.perf_counter() - started)
    except OSError:
        return None


def probe_directory(model: str) -> Path:
    """Where to probe the disk: the current directory (outputs usually go below it), unless that is
    inside the source checkpoint, which is never written, even for a moment: then the temp directory."""
    here, source = Path.cwd().resolve(), Path(model).resolve()
    inside = source.is_dir() and (here == source or source in here.parents)
    return Path(tempfile.gettempdir()) if inside else here


PROBE_TOKENS = 128  # a probe forward: long enough for full-size matmuls, short enough for 70B on a CPU
# on a GPU a forward of 128 tokens is bound by its latency, not its arithmetic, and would plan too
# much time: there the probe forwards the run's own shape, up to this many tokens
GPU_PROBE_TOKENS = 8192


def probe_shape(device: torch.device, forward_shape: tuple[int, int] | None) -> tuple[int, int]:
    """[samples, tokens] of the probe's forward: PROBE_TOKENS on a CPU (a 70B layer's forward of a
    run's 2048 tokens takes minutes there); on a GPU the run's micro-batch `forward_shape`
    ([batch_size, seqlen]), at most GPU_PROBE_TOKENS tokens in all."""
    if device.type == "cpu" or forward_shape is None:
        return 1, PROBE_TOKENS
    batch, seqlen = forward_shape
    seqlen = min(seqlen, GPU_PROBE_TOKENS)
    return max(1, min(batch, GPU_PROBE_TOKENS // seqlen)), seqlen


def probe_rates(config: dict, compute: torch.dtype, device: torch.device,
                forward_shape: tuple[int, int] | None = None) -> dict:  # fmt: skip
    """What the run computes, timed here (best of two after a warm-up): one decoder layer of this
    geometry in the compute dtype on the device, forwarding probe_shape's tokens (attention, norms and
    rotary included; its weights one constant but a MoE router's, see probe_tensors); a
    float32 matmul (statistics such as SparseGPT's Hessians, and its solve); the passes over every
    pruned weight (weights_per_second); SparseGPT's column steps (steps_per_second). A square
    matmul alone, or the forward without the weight passes, leaves out much of a CPU run's time
    (benchmarks/RESULTS.md, "The plan's time estimate against the run")."""
    g = Geometry.from_config(config)
    runner = LayerRunner(config, family_of(config), device, compute)
    tensors = probe_tensors(runner, compute)
    samples, tokens = probe_shape(device, forward_shape)
    hidden = torch.randn(samples, tokens, g.hidden, dtype=compute, device=device)
    with torch.no_grad():
        layer = runner.build(0, tensors)
        forward = _best_seconds(lambda: runner.forward(layer, 0, hidden), device)
    del layer, tensors
    flops = samples * (2 * g.active_linear_params * tokens + 2 * g.heads * g.head_dim * tokens**2)
    rows, cols = max(g.linear_shapes().values(), key=lambda shape: shape[0] * shape[1])
    # float32 matmuls (statistics, solves) run at their own rate, on a GPU far below the bfloat16
    # forward's (benchmarks/RESULTS.md, "One llama-2-70b layer on a GPU", SparseGPT)
    solve = measure_matmul_flops(torch.float32, device)
    return {"forward": flops / forward, "solve": solve, "weights": weights_per_second(rows, cols, compute, device),
            "steps": steps_per_second(device)}  # fmt: skip


def probe_tensors(runner, compute: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer 0's tensors for the probe: one constant value each, as a matmul's speed does not depend
    on it; but a MoE router's random, as a constant one sends every token to the same top-k experts
    and the probe would run only those, timing a fraction of the layer's work."""
    tensors = {name: torch.full(p.shape, 0.01 if p.dim() == 2 else 1.0, dtype=compute)
               for name, p in runner.skeleton(0).state_dict().items()}  # fmt: skip
    if runner.experts is not None:
        router = f"{runner.experts.block}.gate.weight"  # [experts, hidden]
        tensors[router] = torch.randn(tensors[router].shape, generator=torch.Generator().manual_seed(0)).to(compute)
    return tensors


# at most this much of the largest Linear (all of a 70B's): a smaller slice runs faster than the
# whole, and would plan too little time
PROBE_WEIGHTS = 1 << 28


def weights_per_second(rows: int, cols: int, compute: torch.dtype, device: torch.device) -> float:
    """Pruned weights per second through the run's passes over each of them, on the largest Linear
    ([rows, cols], or as many of its rows as PROBE_WEIGHTS holds) in the compute dtype: the finite
    check, a score (Wanda's), the row mask (and its copy to the CPU), the mask applied, the zeros
    counted, timed once after a warm-up on a few rows. On a CPU in bfloat16 these passes, not the
    matmuls, take most of a layer's time."""
    weight = torch.randn(min(rows, max(1, PROBE_WEIGHTS // cols)), cols, device=device).to(compute)
    sq_norm = torch.rand(cols, device=device)

    def passes(weight):
        nonfinite_counts(weight)
        mask = row_prune_mask(wanda_scores(weight, sq_norm), 0.5)
        mask.cpu()  # as the run brings each mask to the CPU on a GPU, where that copy outweighs the passes
        return zero_count(apply_mask(weight, mask))

    passes(weight[:8])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    passes(weight)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return weight.numel() / (time.perf_counter() - started)


def steps_per_second(device: torch.device, columns: int = 256) -> float:
    """SparseGPT's column steps per second where each is small: their overhead, not their FLOPs."""
    weight = torch.randn(64, columns, device=device)
    hinv = torch.eye(columns, device=device)
    seconds = _best_seconds(lambda: obs_prune(weight.clone(), hinv, Target(sparsity=0.5), 128), device)
    return columns / seconds


def _best_seconds(work, device: torch.device, repeats: int = 2) -> float:
    work()  # warm-up
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def measure_matmul_flops(dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
                         repeats: int = 5) -> float:  # fmt: skip
    """The device's square-matmul FLOP/s in `dtype` (best of `repeats`; a CPU with torch's threads).
    A GPU multiplies 8192 x 8192 (a smaller product leaves it bound by latency), a CPU 1024 x 1024."""
    size = 1024 if device.type == "cpu" else 8192
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    return 2 * size**3 / _best_seconds(lambda: torch.mm(a, b), device, repeats)


def gpu_flops(name: str) -> float | None:
    """Assumed FLOP/s of a GPU named like one in GPU_PEAK_TFLOPS ("NVIDIA H100 80GB HBM3" -> h100)."""
    key = name.lower().replace(" ", "").replace("-", "")
    for known, tflops in GPU_PEAK_TFLOPS.items():
        if known in key:
            return tflops * 1e12 * GPU_EFFICIENCY
    return None


def assumed_rates(named: str) -> dict:
    """A GPU that is not here (a key of GPU_PEAK_TFLOPS): FLOP/s assumed from its data sheet, the
    bfloat16 peak for forwards and the float32 one for statistics and solves; weight passes and
    SparseGPT's column steps at rates assumed from an H200's."""
    return {"forward": gpu_flops(named), "weights": 1e10, "steps": 1e4,
            "solve": GPU_FLOAT32_TFLOPS[named] * 1e12 * GPU_FLOAT32_EFFICIENCY}  # fmt: skip


def local_rates(config: dict, compute: torch.dtype, device: torch.device, memory: int | None,
                forward_shape: tuple[int, int] | None = None) -> dict | None:  # fmt: skip
    """probe_rates where one layer in the compute dtype takes at most a quarter of `memory`;
    otherwise a square matmul's rate in the compute dtype (assumed from the data sheet on a GPU) for
    the forwards, a float32 one measured here for the solves (optimistic)."""
    layer_bytes = Geometry.from_config(config).layer_params * compute.itemsize
    if memory is not None and layer_bytes > memory / 4:
        rate = measure_matmul_flops(compute) if device.type == "cpu" else gpu_flops(torch.cuda.get_device_name(device))
        if rate is None:
            return None
        return {"forward": rate, "solve": measure_matmul_flops(torch.float32, device), "weights": 1e8, "steps": 1e4}
    return probe_rates(config, compute, device, forward_shape)
