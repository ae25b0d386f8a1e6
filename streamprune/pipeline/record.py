"""The run record (streamprune.json): what ran, on what, how long, at what memory, with what
result; and `@step`, which ties the run's steps to the plan's terms by the resident size after each."""

from __future__ import annotations

import functools
import platform
import resource
import sys

import torch
import transformers

from ..calibration import CALIBRATION_FILE
from ..plan.memory import current_rss_bytes
from ..version import __version__
from .context import RunContext


def step(name: str):
    """Mark a method of the run (its first argument holds `step_rss`) as the plan's step `name`: the
    run records that it took it and the resident size after it, which benchmarks compare with the
    plan's terms."""

    def mark(function):
        @functools.wraps(function)
        def run_step(self, *args, **kwargs):
            result = function(self, *args, **kwargs)
            self.step_rss[name] = max(self.step_rss.get(name, 0), current_rss_bytes())
            return result

        return run_step

    return mark


def peak_rss_bytes_by_process(ctx: RunContext) -> list[int] | None:
    """Every process's peak resident size, in rank order (None in the others)."""
    return ctx.job.peers.gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def run_record(ctx: RunContext, step_rss: dict, seconds: float, peak_rss_bytes: list[int]) -> dict:
    """The record of a completed run. `seconds`: this session's and the earlier ones'."""
    config, job, state, layers = ctx.config, ctx.job, ctx.state, ctx.state.layers
    device, source = job.device, job.source
    record = {
        "streamprune": __version__,
        "command": sys.argv,
        "arguments": config.as_record(),
        "source": {
            "model": config.model,
            "directory": str(source.directory),
            "architecture": source.family.architecture,
            "num_hidden_layers": source.num_layers,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "processes": job.peers.world_size,  # torchrun's; peak RSS is the leader's, then by process
        "compute_dtype": str(source.dtype).removeprefix("torch."),
        "method": {"name": job.method.name, **job.method.settings()},
        "allocation": {**(config.method.allocation_settings() or {"name": "uniform"}), **(state.allocation or {})},
        "target_sparsity": config.method.target_sparsity,
        "mean_layer_sparsity": sum(layer["sparsity"] for layer in layers) / max(1, len(layers)),
        "calibration": None,
        "layers": layers,
        "output_files": ctx.writer.files,
        "sessions": state.sessions,  # more than one: the run was resumed
        "total_seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes[0],
        "peak_rss_bytes_by_process": peak_rss_bytes,  # in rank order (torchrun); the first is this one's
        "peak_vram_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "rss_after_step_bytes": step_rss,  # this session's; compare with the plan's ram_by_step
        "plan": {key: value for key, value in ctx.resolved.plan.items() if key != "peak_ram_parts"},
        "offload": ctx.resolved.offload,
        # what shapes the result where the arguments left it to the plan (auto); a session's own choices
        # (offload, checkpoint_every) are in "plan"
        "resolved": {"batch_size": ctx.resolved.batch_size, "expert_weights": ctx.resolved.expert_weights},
    }
    if ctx.calibration is not None:
        record["calibration"] = {k: v for k, v in ctx.calibration.items() if k != "input_ids"}
        record["calibration"]["ids_file"] = CALIBRATION_FILE
        if job.seqlen != config.calibration.seqlen:
            record["calibration"]["seqlen_capped_from"] = config.calibration.seqlen
    return record
