"""Healing pruned SmolLM2-135M: perplexity before and after each way of healing, and the recovery
r = (ln ppl_pruned - ln ppl_healed) / (ln ppl_pruned - ln ppl_dense).

    python benchmarks/heal.py                                   # every cell: several hours on 2 CPU cores
    python benchmarks/heal.py --pruned "depth 6/30 (bi)" --healing LoRA,both

Pruned models (never healed): "Wanda 50%", "Wanda 2:4", "SparseGPT 2:4" (`streamprune run`, 32 x
512 calibration tokens of the C4 documents, seed 0) and "depth 6/30 (bi)" (`streamprune depth
--remove 6 --criterion bi`, the paper's 10 x 128 scoring tokens, seed 1234). Healings:
- "reconstruct": the same pruning with `--reconstruct` (run: each pruned block trained toward the
  dense block's outputs, 4 epochs; depth: each block before a removed span trained toward the span's
  output, on 32 x 512 C4 tokens);
- "LoRA": `streamprune heal` on the pruned model (LoRA rank 16 through the masks, --steps x 1 x 512
  C4 tokens, lr 1e-3, fp32 base, no gradient checkpointing: RAM is plenty here, time is not);
- "both": `streamprune heal` on the reconstructed model.
The training text is C4; perplexity is WikiText-2 test, the first --ppl-windows windows of 512 tokens,
which no pruning or healing sees. Every measured cell is kept in benchmarks/heal.json (a long run
goes on where it stopped), and the table in RESULTS.md (section heal) is rewritten after each.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # the real test models' builders
from common import C4, code_version, conditions, perplexity, pick_labels, streamprune, write_section
from smollm2 import build

RUN = ["--calib", str(C4), "--nsamples", "32", "--seqlen", "512", "--seed", "0", "--quiet", "--force"]
DEPTH = ["--calib", str(C4), "--quiet", "--force"]
PRUNED = {
    "Wanda 50%": ("run", ["--method", "wanda", "--sparsity", "0.5", *RUN]),
    "Wanda 2:4": ("run", ["--method", "wanda", "--pattern", "2:4", *RUN]),
    "SparseGPT 2:4": ("run", ["--method", "sparsegpt", "--pattern", "2:4", *RUN]),
    "depth 6/30 (bi)": ("depth", ["--remove", "6", "--criterion", "bi", *DEPTH]),
}
HEALINGS = ("reconstruct", "LoRA", "both")
CELLS = Path(__file__).resolve().parent / "heal.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pruned", default=",".join(PRUNED), help=f"comma-separated, from: {', '.join(PRUNED)}".replace("%", "%%"))
    parser.add_argument("--healing", default=",".join(HEALINGS), help=f"comma-separated, from: {', '.join(HEALINGS)}")
    parser.add_argument("--steps", type=int, default=80, help="LoRA steps of 512 tokens (about 10 min on 2 free cores)")
    parser.add_argument("--ppl-windows", type=int, default=40)
    args = parser.parse_args()
    wanted = pick_labels(args.pruned, PRUNED, "pruned models")
    healings = pick_labels(args.healing, dict.fromkeys(HEALINGS), "healings")
    settings = {"steps": args.steps, "ppl_windows": args.ppl_windows}
    saved = json.loads(CELLS.read_text()) if CELLS.exists() else {"settings": settings, "cells": {}}
    if saved["settings"] != settings:
        sys.exit(f"{CELLS} holds cells measured with {saved['settings']}; use those, or move the file away")
    cells = saved["cells"]
    model = build()
    work = Path(tempfile.mkdtemp())

    def keep(key: str, ppl: float, seconds: float) -> None:
        cells[key] = {"ppl": ppl, "seconds": seconds, "commit": code_version()}
        CELLS.write_text(json.dumps(saved, indent=1) + "\n")
        print(f"{key}: ppl {ppl:.2f}, {seconds:.0f} s", flush=True)
        write_section("heal", table(cells, args))

    try:
        if "dense" not in cells:
            keep("dense", perplexity(model, work, args.ppl_windows), 0.0)
        for label in wanted:
            command, flags = PRUNED[label]
            for healing in ("none", *healings):
                key = f"{label} | {healing}"
                if key in cells:
                    continue
                reconstructed = healing in ("reconstruct", "both")
                pruned = work / ("reconstructed" if reconstructed else "pruned")
                prune_seconds = 0.0
                if not (pruned / "streamprune.json").is_file():
                    prune_seconds = prune(command, model, pruned, [*flags, *(["--reconstruct"] if reconstructed else [])])
                    if healing in ("none", "reconstruct"):
                        keep(key, perplexity(pruned, work, args.ppl_windows), prune_seconds)
                        continue
                healed = work / "healed"
                heal_seconds = lora(pruned, healed, args.steps)
                keep(key, perplexity(healed, work, args.ppl_windows), heal_seconds)
                shutil.rmtree(healed)
            for name in ("pruned", "reconstructed"):
                shutil.rmtree(work / name, ignore_errors=True)
    finally:
        shutil.rmtree(work)


def prune(command: str, model: Path, out: Path, flags: list[str]) -> float:
    """Run the real command; its record's total time in seconds."""
    streamprune(command, str(model), "--out", str(out), *flags)
    return json.loads((out / "streamprune.json").read_text())["total_seconds"]


def lora(model: Path, out: Path, steps: int) -> float:
    streamprune(
        "heal", str(model), "--out", str(out), "--data", str(C4), "--steps", str(steps), "--batch-size", "1",
        "--seqlen", "512", "--lr", "1e-3", "--base", "fp32", "--no-gradient-checkpointing", "--quiet", "--force",
    )  # fmt: skip
    return json.loads((out / "streamprune.json").read_text())["total_seconds"]


def recovery(dense: float, pruned: float, healed: float) -> float:
    return (math.log(pruned) - math.log(healed)) / (math.log(pruned) - math.log(dense))


def table(cells: dict, args) -> str:
    dense = cells["dense"]["ppl"]
    lines = [
        "## Healing pruned SmolLM2-135M: perplexity before and after",
        "",
        "Command: `python benchmarks/heal.py" + (f" --steps {args.steps}" if args.steps != 80 else "")
        + (f" --ppl-windows {args.ppl_windows}" if args.ppl_windows != 40 else "") + "` (cells kept in "
        "benchmarks/heal.json). reconstruct: `--reconstruct` on the pruning (4 epochs, Adam, lr 1e-3, 32 x 512 "
        f"C4 tokens); LoRA: `streamprune heal` (rank 16 through the masks, {args.steps} steps x 512 C4 tokens, "
        "lr 1e-3, fp32 base); both: LoRA on the reconstructed model. Perplexity: WikiText-2 test, the first "
        f"{args.ppl_windows} windows of 512 tokens (never seen by pruning or healing); dense {dense:.2f}. "
        "Recovery r = (ln ppl_pruned - ln ppl_healed) / (ln ppl_pruned - ln ppl_dense): 1 is the dense "
        "model again, 0 no change. Time: the pruning run's total_seconds (reconstruct: the run with it), "
        "or the heal's (LoRA and both: healing only). One run each, on a shared machine.",
        "",
        conditions(),
        "",
        "| pruned model | ppl pruned | " + " | ".join(f"{h}: ppl, r, time" for h in HEALINGS) + " |",
        "|---|---:|" + "---:|" * len(HEALINGS),
    ]
    for label in PRUNED:
        pruned = cells.get(f"{label} | none")
        if pruned is None:
            continue
        row = [label, f"{pruned['ppl']:.2f} ({pruned['seconds']:.0f} s)"]
        for healing in HEALINGS:
            cell = cells.get(f"{label} | {healing}")
            row.append(
                "-" if cell is None
                else f"{cell['ppl']:.2f}, r {recovery(dense, pruned['ppl'], cell['ppl']):.2f}, {cell['seconds']:.0f} s"
            )  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    commits = sorted({cell["commit"] for cell in cells.values()})
    lines += ["", f"Cells measured at commits {', '.join(commits)}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
