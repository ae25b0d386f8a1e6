"""Two processes against one on the same run: `torchrun --nproc-per-node 2 -m streamprune run` (gloo,
CPU) against `streamprune run`, SmolLM2-135M, Wanda 50%, 64 x 512 C4 calibration tokens.

    python benchmarks/distributed.py        # ~8 min on 2 idle CPU cores

Measured: wall time (the run record's total_seconds), each process's peak RSS (the record's
peak_rss_bytes_by_process, from getrusage), and how many weights are zero in one output and not the
other (masks agree within the rounding of a different summation order). One process runs twice: with
torch's default threads (what a user gets) and with one thread (what each of torchrun's processes
gets: it sets OMP_NUM_THREADS=1), so the speed-up is shown both ways. The table goes to
benchmarks/RESULTS.md (section distributed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # the real test models' builders
from common import C4, ROOT, conditions, write_section  # noqa: E402
from smollm2 import build  # noqa: E402

FLAGS = ["--sparsity", "0.5", "--nsamples", "64", "--seqlen", "512", "--calib", str(C4), "--seed", "0",
         "--device", "cpu", "--quiet"]  # fmt: skip
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run(model: Path, out: Path, processes: int, threads: int | None) -> dict:
    command = [sys.executable, "-m", "streamprune", "run", str(model), "--out", str(out), *FLAGS]
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        command = [sys.executable, *launcher, "-m", "streamprune", "run", str(model), "--out", str(out), *FLAGS]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return json.loads((out / "streamprune.json").read_text())


def zero_masks(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    masks = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(out / file, "pt") as f:
            masks.update({name: f.get_tensor(name) == 0 for name in f.keys() if any(x in name for x in LINEARS)})
    return masks


def main() -> None:
    model = build()
    work = Path(tempfile.mkdtemp())
    try:
        runs = {
            "1 process, torch's default threads": run(model, work / "one", 1, None),
            "1 process, 1 thread": run(model, work / "one-thread", 1, 1),
            "2 processes (torchrun), 1 thread each": run(model, work / "two", 2, None),
        }
        masks = {name: zero_masks(work / name) for name in ("one", "one-thread", "two")}
    finally:
        shutil.rmtree(work)
    total = sum(mask.numel() for mask in masks["two"].values())
    differ = {
        name: sum(int((masks[name][linear] != masks["two"][linear]).sum()) for linear in masks["two"])
        for name in ("one", "one-thread")
    }
    base = runs["1 process, torch's default threads"]
    gib = 2**30
    lines = [
        "## Several processes (torchrun, gloo on the CPU)",
        "",
        "Command: `python benchmarks/distributed.py`. SmolLM2-135M, Wanda 50%, 64 x 512 C4 calibration tokens "
        "(seed 0), float32; two processes launched as `torchrun --standalone --nproc-per-node 2 -m streamprune "
        "run ...` (each holds 32 of the 64 samples). Seconds: the run record's total_seconds; peak RSS: each "
        "process's getrusage peak.",
        "",
        conditions(),
        "",
        "| run | seconds | speed-up | peak RSS per process |",
        "|---|---:|---:|---|",
    ]
    for label, record in runs.items():
        peaks = ", ".join(f"{peak / gib:.2f} GiB" for peak in record["peak_rss_bytes_by_process"])
        speed = base["total_seconds"] / record["total_seconds"]
        lines.append(f"| {label} | {record['total_seconds']:.0f} | {speed:.2f}x | {peaks} |")
    largest = max(runs["2 processes (torchrun), 1 thread each"]["peak_rss_bytes_by_process"])
    lines += [
        "",
        f"Masks of the two-process output against the one-process run with the same kernels (one thread): "
        f"{differ['one-thread']} of {total:,} pruned-Linear weights differ, **{100 * (1 - differ['one-thread'] / total):.4f}%** "
        f"agree (bar: 99.9%); against the one-process run with two threads (whose matmuls round differently): "
        f"{differ['one']} differ, {100 * (1 - differ['one'] / total):.4f}% agree. Largest per-process peak RSS "
        f"with two processes: {largest / gib:.2f} GiB, {largest / base['peak_rss_bytes']:.2f}x the one-process peak.",
    ]
    write_section("distributed", "\n".join(lines))


if __name__ == "__main__":
    main()
