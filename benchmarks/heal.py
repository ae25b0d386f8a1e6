"""Healing pruned SmolLM2-135M: perplexity before and after, and the recovery
r = (ln ppl_pruned - ln ppl_healed) / (ln ppl_pruned - ln ppl_dense).

    python benchmarks/heal.py                                   # every pair below: about 2 h on 2 CPU cores
    python benchmarks/heal.py --pairs "depth 6/30 (bi)"          # only these

Each pair is one pruning without healing and one with it, on the same settings:
- "Wanda 50%", "SparseGPT 2:4": `streamprune run` with 32 x 512 calibration tokens of the C4
  documents (seed 0), healed by `--reconstruct` (each pruned block trained toward the dense
  block's outputs, 4 epochs);
- "depth 6/30 (bi)": `streamprune depth --remove 6 --criterion bi` (the paper's 10 x 128 scoring
  tokens, seed 1234), healed by `--reconstruct` (each block before a removed span trained toward
  the span's output, on 32 x 512 C4 tokens).
The healing never sees the evaluation text: perplexity is WikiText-2 test, the first --ppl-windows
windows of 512 tokens. LoRA healing (`streamprune heal`) is not built yet, so it has no rows.
Rows are written to RESULTS.md (section heal) after every pair.
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
from common import C4, conditions, perplexity, pick_labels, streamprune, write_section
from smollm2 import build

RUN = ["--calib", str(C4), "--nsamples", "32", "--seqlen", "512", "--seed", "0", "--quiet", "--force"]
DEPTH = ["--calib", str(C4), "--quiet", "--force"]
PAIRS = {
    "Wanda 50%": ("run", ["--method", "wanda", "--sparsity", "0.5", *RUN]),
    "SparseGPT 2:4": ("run", ["--method", "sparsegpt", "--pattern", "2:4", *RUN]),
    "depth 6/30 (bi)": ("depth", ["--remove", "6", "--criterion", "bi", *DEPTH]),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    choices = f"comma-separated, from: {', '.join(PAIRS)}".replace("%", "%%")  # argparse formats help with %
    parser.add_argument("--pairs", default=",".join(PAIRS), help=choices)
    parser.add_argument("--ppl-windows", type=int, default=40)
    args = parser.parse_args()
    wanted = pick_labels(args.pairs, PAIRS, "pairs")
    model = build()
    work = Path(tempfile.mkdtemp())
    try:
        dense = perplexity(model, work, args.ppl_windows)
        rows = []
        for label in wanted:
            command, flags = PAIRS[label]
            row = {"label": label}
            for healed in (False, True):
                out = work / "out"
                seconds = prune(command, model, out, [*flags, *(["--reconstruct"] if healed else [])])
                row["healed" if healed else "pruned"] = (perplexity(out, work, args.ppl_windows), seconds)
                shutil.rmtree(out)
            rows.append(row)
            print(f"{label}: {row}", flush=True)
            write_section("heal", table(rows, dense, args))
    finally:
        shutil.rmtree(work)


def prune(command: str, model: Path, out: Path, flags: list[str]) -> float:
    """Run the real command; its record's total time in seconds."""
    streamprune(command, str(model), "--out", str(out), *flags)
    return json.loads((out / "streamprune.json").read_text())["total_seconds"]


def recovery(dense: float, pruned: float, healed: float) -> float:
    return (math.log(pruned) - math.log(healed)) / (math.log(pruned) - math.log(dense))


def table(rows: list[dict], dense: float, args) -> str:
    lines = [
        "## Healing pruned SmolLM2-135M: perplexity before and after",
        "",
        f'Command: `python benchmarks/heal.py --pairs "{",".join(row["label"] for row in rows)}"'
        + (f" --ppl-windows {args.ppl_windows}" if args.ppl_windows != 40 else "")
        + "`. Healing: `--reconstruct` (4 epochs, Adam, lr 1e-3, on 32 x 512 C4 tokens). Perplexity: "
        f"WikiText-2 test, the first {args.ppl_windows} windows of 512 tokens (never seen by pruning or "
        f"healing); dense {dense:.2f}. Recovery r = (ln ppl_pruned - ln ppl_healed) / (ln ppl_pruned - "
        "ln ppl_dense): 1 is the dense model again, 0 no change. Times: the run records' total_seconds "
        "(one run each, shared machine). LoRA healing is not built yet.",
        "",
        conditions(),
        "",
        "| pruned model | ppl pruned | ppl healed | recovery r | time pruned | time healed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        (pruned, pruned_s), (healed, healed_s) = row["pruned"], row["healed"]
        lines.append(
            f"| {row['label']} | {pruned:.2f} | {healed:.2f} | {recovery(dense, pruned, healed):.2f} | "
            f"{pruned_s:.0f} s | {healed_s:.0f} s |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
