"""Depth pruning SmolLM2-135M: 6 of its 30 blocks removed by each criterion, against the dense model.

    python benchmarks/depth.py [--limit 50] [--ppl-windows 40]     # about 40 minutes on 2 CPU cores

Scoring: `streamprune depth --remove 6` with the paper's defaults (10 x 128 calibration tokens, seed
1234, blocks 0-3 and the last two protected), calibration text: the C4 documents in the data folder
(STREAMPRUNE_DATA; the paper used BookCorpus, which is not available here). Perplexity: WikiText-2 test, 512-token
windows, the first --ppl-windows. Zero-shot: the seven tasks, the first --limit examples each.
Generation: transformers' greedy generate, batch 1, a 16-token prompt, exactly 128 new tokens, CPU;
every model loaded, then --rounds (7) interleaved timed runs of each after a warm-up; the median, as
tokens/s and as a ratio to the dense model. Every number is measured here; the table goes to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # the real test models' builders
from common import C4, conditions, evaluate, streamprune, write_section
from smollm2 import build

CRITERIA = ["magnitude", "bi", "ppl", "taylor"]
NEW_TOKENS = 128


def parameters(model: Path) -> int:
    from streamprune.checkpoint import Checkpoint

    return sum(math.prod(info.shape) for info in Checkpoint(model).tensors.values())


def generation_seconds(models: list[Path], rounds: int) -> list[float]:
    """Median wall time of greedy generation of exactly NEW_TOKENS tokens at batch 1, per model.
    Every model is loaded first and the timed runs interleave (round 1: each model once, round 2:
    each again, ...), so that a slow spell of this shared machine hits all of them alike."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models[0])
    nets = [AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval() for m in models]
    ids = tokenizer("The history of the city begins in the year", return_tensors="pt").input_ids[:, :16]
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for net in nets:
            net.generate(ids, **settings)  # warm-up
        for _ in range(rounds):
            for net, spent in zip(nets, times):
                started = time.perf_counter()
                out = net.generate(ids, **settings)
                spent.append(time.perf_counter() - started)
                assert out.shape[1] - ids.shape[1] == NEW_TOKENS
    return [statistics.median(spent) for spent in times]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=50, help="examples per zero-shot task")
    parser.add_argument("--ppl-windows", type=int, default=40, help="WikiText-2 windows of 512 tokens")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved generation timings per model")
    args = parser.parse_args()
    model = build()
    work = Path(tempfile.mkdtemp())
    rows = []
    try:
        for criterion in [None, *CRITERIA]:
            label = "dense (30 blocks)" if criterion is None else f"{criterion}, 6 removed"
            print(f"{label} ...", flush=True)
            target, report = model, None
            if criterion is not None:
                target = work / criterion
                streamprune(
                    "depth", str(model), "--out", str(target), "--criterion", criterion, "--remove", "6",
                    "--calib", str(C4), "--quiet",
                )  # fmt: skip
                report = json.loads((target / "depth_scores.json").read_text())
            ppl, tasks = evaluate(target, work, args.ppl_windows, args.limit)
            acc = tasks["average_acc"]
            rows.append((label, report, ppl, acc, parameters(target), target))
            print(f"  ppl {ppl:.2f}, average acc {acc:.4f}", flush=True)
        print(f"timing generation, {args.rounds} interleaved rounds ...", flush=True)
        medians = generation_seconds([row[5] for row in rows], args.rounds)
        rows = [(*row[:5], seconds) for row, seconds in zip(rows, medians)]
    finally:
        shutil.rmtree(work)

    dense_seconds, dense_params = rows[0][5], rows[0][4]
    lines = [
        "## Depth pruning SmolLM2-135M: 6 of 30 blocks removed",
        "",
        "Command: `python benchmarks/depth.py"
        + (
            f" --limit {args.limit} --ppl-windows {args.ppl_windows} --rounds {args.rounds}`."
            if (args.limit, args.ppl_windows, args.rounds) != (50, 40, 7)
            else "`."
        )  # fmt: skip
        + " Scoring: `streamprune depth --remove 6` (10 x 128 calibration tokens of "
        "`c4/c4_validation_2k.jsonl.gz`, seed 1234, blocks 0-3 and 28-29 protected, CPU, float32). "
        f"Perplexity: WikiText-2 test, the first {args.ppl_windows} windows of 512 tokens. Zero-shot: mean `acc` "
        f"of the seven tasks, the first {args.limit} examples each (one standard error is up to "
        f"{50 / args.limit**0.5:.0f} points per task). Generation: greedy, batch 1, 16-token prompt, exactly "
        f"{NEW_TOKENS} new tokens, transformers on the CPU, every model loaded and the timed runs interleaved, "
        f"median of {args.rounds} rounds; speed-up = dense time / pruned time. All four pruned models have the "
        "same 24 blocks, so their spread in tokens/s is the timing noise of this machine. "
        "Reads: bytes of the checkpoint read while scoring, as a multiple of its size.",
        "",
        conditions(),
        "",
        "| model | removed blocks | WikiText-2 ppl | zero-shot avg | parameters | tokens/s | speed-up | "
        "scoring time | reads |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, report, ppl, acc, params, seconds in rows:
        removed = "-" if report is None else ", ".join(map(str, report["removed"]))
        scoring = "-" if report is None else f"{report['scoring_seconds']:.0f} s"
        reads = "-" if report is None else f"{report['bytes_read'] / report['checkpoint_bytes']:.2f}x"
        lines.append(
            f"| {label} | {removed} | {ppl:.2f} | {100 * acc:.1f} | {params / 1e6:.1f} M ({params / dense_params:.0%}) "
            f"| {NEW_TOKENS / seconds:.1f} | {dense_seconds / seconds:.2f}x | {scoring} | {reads} |"
        )
    body = "\n".join(lines)
    write_section("depth", body)


if __name__ == "__main__":
    main()
