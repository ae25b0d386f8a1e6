"""How honest is the plan's time estimate? `streamprune plan` (its rates probed on this machine:
one decoder layer of the model's geometry forwarding in the compute dtype, a float32 matmul, the
passes over the pruned weights, SparseGPT's column steps) against the wall time of the run it
planned, run right after it on the same machine.

    python benchmarks/eta.py            # ~15 min on 2 idle CPU cores (builds a 6 GB model once)

Cases: SmolLM2-135M float32, Wanda 50% and SparseGPT 2:4 (32 x 512 C4 calibration tokens), and 3
layers of Llama-2-70B's layer geometry in bfloat16 (Wanda 50%, 4 x 256). Measured: the run record's
total_seconds. The table goes to benchmarks/RESULTS.md (section eta).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # the real test models' builders
from common import C4, conditions, streamprune, write_section  # noqa: E402
from memory import synthetic_model  # noqa: E402
from smollm2 import build  # noqa: E402

# Llama-2-70B's layer: a bfloat16 layer is 1.7 GB, and bfloat16 matmuls on a CPU are slow
SEVENTY_B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
CALIB = ["--calib", str(C4), "--seed", "0"]


def cases(smol: Path) -> list[tuple[str, Path, list[str]]]:
    seventy = synthetic_model(3, smol, SEVENTY_B, "70b-geometry-bf16", dtype="bfloat16")
    return [
        ("SmolLM2-135M, Wanda 50%, float32, 32 x 512", smol, ["--sparsity", "0.5", "--nsamples", "32", "--seqlen", "512"]),
        ("SmolLM2-135M, SparseGPT 2:4, float32, 32 x 512", smol,
         ["--method", "sparsegpt", "--pattern", "2:4", "--nsamples", "32", "--seqlen", "512"]),
        ("Llama-2-70B geometry, 3 layers, Wanda 50%, bfloat16, 4 x 256", seventy,
         ["--sparsity", "0.5", "--nsamples", "4", "--seqlen", "256", "--dtype", "bfloat16"]),
    ]  # fmt: skip


def planned_seconds(model: Path, flags: list[str]) -> float:
    command = [sys.executable, "-m", "streamprune", "plan", str(model), "--device", "cpu", "--json", *flags]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)["seconds"]["total"]


def main() -> None:
    smol = build()
    rows = []
    for label, model, flags in cases(smol):
        print(f"{label} ...", flush=True)
        planned = planned_seconds(model, flags)
        out = Path(tempfile.mkdtemp()) / "out"
        try:
            streamprune("run", str(model), "--out", str(out), *flags, *CALIB, "--device", "cpu", "--quiet")
            measured = json.loads((out / "streamprune.json").read_text())["total_seconds"]
        finally:
            shutil.rmtree(out.parent)
        rows.append((label, planned, measured))
        print(f"  planned {planned:.0f} s, measured {measured:.0f} s", flush=True)
    lines = [
        "## The plan's time estimate against the run (CPU)",
        "",
        "Command: `python benchmarks/eta.py`. Planned: `streamprune plan --device cpu` with the run's flags (its "
        "rates probed here: one decoder layer of the geometry forwarding 128 tokens in the compute dtype, a "
        "float32 matmul, the passes over every pruned weight on the largest Linear, SparseGPT's column steps; "
        "the disk's write speed; I/O added to compute on a CPU), "
        "then measured: the run's total_seconds, right after, on the same machine.",
        "",
        conditions(),
        "",
        "| run | planned | measured | planned / measured |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {label} | {planned:.0f} s | {measured:.0f} s | {planned / measured:.2f} |" for label, planned, measured in rows]
    worst = max(abs(planned / measured - 1) for _, planned, measured in rows)
    lines.append(f"\nLargest error: **{100 * worst:.0f}%** of the measured time (bar: 30%).")
    write_section("eta", "\n".join(lines))


if __name__ == "__main__":
    main()
