"""One decoder layer of a large model's geometry (default Llama-2-70B: hidden 8192, intermediate
28672, 64 heads, 8 KV heads; random bf16 weights) pruned on a GPU with 128 x 2048 calibration tokens,
exactly as the layer loop does it (the run's collect_statistics, prune_linears and forward_batches;
the activation buffer, 128 x 2048 x 8192 bf16 = 4 GiB, in pinned CPU RAM): peak VRAM and seconds
per layer for each method, each step timed, beside the plan's estimate for the same settings (its
rates probed on this GPU).

    python benchmarks/gpu_layer.py                                   # wanda and sparsegpt, Llama-2-70B
    python benchmarks/gpu_layer.py --model mixtral-8x7b --methods wanda --section gpu-layer-moe
    python benchmarks/gpu_layer.py --device cpu --nsamples 2 --seqlen 64 --model llama-3.2-1b  # a smoke run

Needs a CUDA GPU for the numbers that matter; without one (and without --device cpu) it measures
nothing and says so in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # the real test models' builders
from common import conditions, write_section  # noqa: E402

from streamprune.families import LayerRunner, family_of  # noqa: E402
from streamprune.methods import Target, method_named  # noqa: E402
from streamprune.pipeline import collect_statistics, prune_linears  # noqa: E402
from streamprune.plan.geometry import Geometry  # noqa: E402
from streamprune.plan.memory import Settings, estimate  # noqa: E402
from streamprune.plan.probes import local_rates  # noqa: E402
from streamprune.plan.report import seconds  # noqa: E402
from streamprune.source import ALIAS_CONFIGS, ALIASES  # noqa: E402
from streamprune.stream import forward_batches  # noqa: E402

GIB = 2**30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work, peaks: dict, step: str) -> tuple[object, float]:
    """work()'s result and seconds; its peak VRAM (bytes allocated by torch) into peaks[step]."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    took = time.perf_counter() - started
    if device.type == "cuda":
        peaks[step] = torch.cuda.max_memory_allocated(device)
    return result, took


def prune_one_layer(runner: LayerRunner, tensors: dict, hidden: torch.Tensor, method_name: str) -> dict:
    """The layer loop's three steps on one layer; seconds and peak VRAM of each, and the peak."""
    device = runner.device
    method = method_named(method_name)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peaks = {}
    with torch.no_grad():
        layer, build = timed(device, lambda: runner.build(0, tensors), peaks, "build")
        if method.needs_calibration:  # the dense forward, statistics collected on the way
            statistics, dense = timed(device, lambda: collect_statistics(
                method.statistic, runner, layer, 0, hidden, 1, write_back=False), peaks, "dense")  # fmt: skip
        else:
            statistics, dense = None, 0.0
        _, prune = timed(device, lambda: prune_as_the_run_does(method, layer, statistics, runner), peaks, "prune")
        _, pruned = timed(device, lambda: forward_batches(
            runner, layer, 0, hidden, 1, write_back=True), peaks, "pruned")  # fmt: skip
    del layer, statistics
    steps = {"build": build, "dense forward + statistics": dense, "prune": prune, "pruned forward": pruned}
    return {"method": method_name, "seconds": steps, "total_seconds": sum(steps.values()),
            "peak_vram_bytes": max(peaks.values()) if peaks else None, "peak_vram_bytes_by_step": peaks}  # fmt: skip


def prune_as_the_run_does(method, layer: torch.nn.Module, statistics: dict | None, runner: LayerRunner) -> None:
    """Every Linear pruned; each result leaves the device before the next Linear, as in the run's
    prune_weights (an earlier version of this benchmark kept them all on the GPU: +1 byte a weight
    for the masks, +4 for SparseGPT's new weights, in its peak VRAM)."""
    for _, pruned in prune_linears(method, layer, statistics, Target(sparsity=0.5), runner.projections):
        pruned.mask.cpu()
        if pruned.weight is not None:
            pruned.weight.to("cpu", torch.bfloat16)


def planned(config: dict, method_name: str, device: torch.device, nsamples: int, seqlen: int, rates) -> dict:
    geometry = Geometry.from_config(config)
    settings = Settings(method=method_name, device=device.type, nsamples=nsamples, seqlen=seqlen)
    plan = estimate(geometry, settings)
    per_layer, terms = None, None
    if rates is not None:  # compute only: this benchmark reads and writes nothing
        per_layer = seconds(plan, rates, 1.0, 1.0, overlap=True)["compute"] / geometry.layers
        # the estimate's terms a layer, to set beside the steps measured
        terms = {"forward": plan["forward_flops"] / rates["forward"],
                 "statistics": plan["statistic_flops"] / rates["solve"],
                 "prune flops": plan["prune_flops"] / rates["solve"],
                 "pruned weights": plan["pruned_weights"] / rates["weights"],
                 "prune steps": plan["prune_steps"] / rates["steps"]}  # fmt: skip
        terms = {name: value / geometry.layers for name, value in terms.items()}
    return {"peak_vram_bytes": plan["peak_vram_bytes"] if device.type == "cuda" else None,
            "seconds_per_layer": per_layer, "seconds_by_term": terms, "layers": geometry.layers}  # fmt: skip


def random_layer(runner: LayerRunner) -> dict:
    torch.manual_seed(0)
    return {name: (torch.randn(p.shape, dtype=torch.bfloat16) * 0.02 if p.dim() == 2 else torch.ones(p.shape))
            for name, p in runner.skeleton(0).state_dict().items()}  # fmt: skip


def table(rows: list[dict]) -> list[str]:
    lines = ["| method | build | dense forward + statistics | prune | pruned forward | s a layer | plan s a layer "
             "| layers x s | peak VRAM | plan VRAM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        s, plan = row["seconds"], row["plan"]
        vram = "" if row["peak_vram_bytes"] is None else f"{row['peak_vram_bytes'] / GIB:.2f} GiB"
        plan_vram = "" if plan["peak_vram_bytes"] is None else f"{plan['peak_vram_bytes'] / GIB:.2f} GiB"
        plan_s = "" if plan["seconds_per_layer"] is None else f"{plan['seconds_per_layer']:.1f}"
        lines.append(
            f"| {row['method']} | {s['build']:.1f} | {s['dense forward + statistics']:.1f} | {s['prune']:.1f} "
            f"| {s['pruned forward']:.1f} | {row['total_seconds']:.1f} | {plan_s} "
            f"| {plan['layers'] * row['total_seconds'] / 60:.1f} min | {vram} | {plan_vram} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-2-70b", help="an alias with built-in sizes")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--section", default="gpu-layer", help="the RESULTS.md section to write")
    parser.add_argument("--json", type=Path, help="also write the measured numbers here")
    args = parser.parse_args()
    config = {**ALIAS_CONFIGS[ALIASES[args.model]], "rms_norm_eps": 1e-5}
    header = [
        f"## One {args.model} layer on a GPU (50%, bf16, {args.nsamples} x {args.seqlen} calibration tokens)",
        "",
        f"Command: `python benchmarks/gpu_layer.py --model {args.model} --methods {args.methods} "
        f"--section {args.section}`.",
        "",
        conditions(),
        "",
    ]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        write_section(args.section, "\n".join(header + ["No GPU here: nothing measured."]))
        return
    runner = LayerRunner(config, family_of(config), device, torch.bfloat16)
    tensors = random_layer(runner)
    hidden = torch.randn(args.nsamples, args.seqlen, config["hidden_size"], dtype=torch.bfloat16)
    hidden = hidden.pin_memory() if device.type == "cuda" else hidden
    rates = local_rates(config, torch.bfloat16, device, None, (1, args.seqlen))  # the plan's probe, on this device
    rows = []
    for method_name in args.methods.split(","):
        row = prune_one_layer(runner, tensors, hidden, method_name)
        row["plan"] = planned(config, method_name, device, args.nsamples, args.seqlen, rates)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    body = header + table(rows) + [
        "",
        "Random weights: the time is the real arithmetic, the masks mean nothing. Seconds per step with the "
        "device synchronized; `layers x s` is compute only (no reading or writing). The plan's seconds are "
        "its compute estimate per layer from rates probed on this device.",
    ]
    write_section(args.section, "\n".join(body))


if __name__ == "__main__":
    main()
