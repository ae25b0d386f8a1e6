"""The plan as a user reads it: the time a run takes at a device's rates, and the report's lines."""

from __future__ import annotations

from ..sizes import format_size
from .memory import Settings


def seconds(plan: dict, rates: dict, read_bytes_per_second: float, write_bytes_per_second: float, overlap: bool) -> dict:
    """Compute and I/O time; with overlap the run takes about the larger, without it the sum (pass
    overlap=False for a CPU run: its reads and writes share the cores that compute, so overlapping
    them saves next to nothing there).
    `rates` (probe_rates): FLOP/s of the layer forwards and of float32 matmuls, pruned weights
    through their passes per second, SparseGPT's column steps per second."""
    compute = (plan["forward_flops"] / rates["forward"] + (plan["statistic_flops"] + plan["prune_flops"]) / rates["solve"]
               + plan["pruned_weights"] / rates["weights"] + plan["prune_steps"] / rates["steps"])  # fmt: skip
    io = plan["bytes_read"] / read_bytes_per_second + plan["bytes_written"] / write_bytes_per_second
    return {"compute": compute, "io": io, "total": max(compute, io) if overlap else compute + io}


def report(plan: dict, settings: Settings, times: dict | None, device_name: str, problems: list[str]) -> str:
    """The plan as the lines a user reads before a run."""
    ram_parts = ", ".join(f"{name} {format_size(n)}" for name, n in plan["peak_ram_parts"].items() if n)
    lines = [
        f"plan: {plan['params'] / 1e9:.2f} B parameters, {format_size(plan['checkpoint_bytes'])} checkpoint, "
        f"one layer {format_size(plan['layer_bytes'])}, activation buffer {format_size(plan['buffer_bytes'])} "
        f"(offload {settings.offload})",
        f"  peak RAM   {format_size(plan['peak_ram_bytes'])} ({ram_parts})",
    ]
    experts, per_token = plan.get("experts", (0, 0))
    if experts:
        lines.insert(1, f"  experts    {experts} a block, {per_token} run per token: a layer holds {experts / per_token:.0f}x "
                        "the MLP weights a token computes with, and a statistic per expert (all counted here)")  # fmt: skip
    if plan.get("experts_in_ram"):
        lines.insert(2, "  experts    kept in RAM (--expert-weights cpu): each visits the GPU while it computes; their "
                        "statistics and pruning run on the CPU, slower than the estimate below")  # fmt: skip
    if plan["peak_vram_bytes"] is not None:
        lines.append(
            f"  peak VRAM  {format_size(plan['peak_vram_bytes'])} (allocated by torch; the CUDA context adds ~0.5 GB)"
        )
    disk = ", ".join(f"{name} {format_size(n)}" for name, n in plan["disk_bytes"].items() if n)
    lines += [
        f"  disk       {format_size(sum(plan['disk_bytes'].values()))} ({disk})",
        f"  I/O        read {format_size(plan['bytes_read'])}, write {format_size(plan['bytes_written'])}"
        + (
            f" ({plan['bytes_written'] / plan['checkpoint_bytes']:.2f}x the output: a resume point every "
            f"{plan['checkpoint_every']} layer(s), {plan['resume_points']} in all; a kill redoes at most "
            f"{plan['checkpoint_every']})"
            if plan["buffer_bytes"]
            else ""
        ),
        f"  compute    {plan['flops'] / 1e12:,.1f} TFLOP",
    ]
    if times is not None:
        overlapped = settings.overlap and settings.device == "cuda"  # as plan_model computed them
        lines.append(
            f"  time       ~{duration(times['total'])} on {device_name} (compute {duration(times['compute'])}, "
            f"I/O {duration(times['io'])}, {'overlapped' if overlapped else 'in sequence'})"
        )
    if plan.get("processes", 1) > 1:
        speed_up = f"; expected speed-up {times['speed_up']:.2f}x over one process" if times else ""
        lines.append(
            f"  processes  {plan['processes']} (torchrun): memory above is each one's (its share of the samples); "
            f"the machine holds {format_size(plan['machine_peak_ram_bytes'])} of RAM{speed_up}"
        )
    lines += [f"  does not fit: {problem}" for problem in problems] or ["  fits the limits"]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
