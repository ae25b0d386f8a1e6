"""What pruning costs SmolLM2-135M: perplexity and zero-shot accuracy of each variant, streamed.

    python benchmarks/quality.py [--limit 100] [--ppl-windows 40]     # about an hour on 2 CPU cores
    python benchmarks/quality.py --variants "RIA 50%,RIA 2:4"        # only these, in a section of their own

Variants: dense | magnitude 50% | Wanda 50% | Wanda 2:4 | Wanda 4:8 | magnitude 2:4 | RIA 50% |
RIA 2:4. With --variants, the table of those rows goes to its own section ("quality-added"), under
the same conditions as the main table, so that a new method gets its rows without re-measuring
the others (whose outputs the golden test keeps byte-identical). Calibration:
128 x 512 tokens of the C4 documents in ../shared/data, seed 0. Perplexity: WikiText-2 test
(wiki.test.raw) at seqlen 512, the first --ppl-windows windows. Zero-shot: the seven tasks, the
first --limit examples of each (the full sets take days on a CPU). Every number comes from
`streamprune run` and `streamprune eval` run here; the table goes to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import C4, TASKS, conditions, evaluate, streamprune, write_section
from smollm2 import build

VARIANTS = [
    ("dense", None),
    ("magnitude 50%", ["--method", "magnitude", "--sparsity", "0.5"]),
    ("Wanda 50%", ["--method", "wanda", "--sparsity", "0.5"]),
    ("Wanda 2:4", ["--method", "wanda", "--pattern", "2:4"]),
    ("Wanda 4:8", ["--method", "wanda", "--pattern", "4:8"]),
    ("magnitude 2:4", ["--method", "magnitude", "--pattern", "2:4"]),
    ("RIA 50%", ["--method", "ria", "--sparsity", "0.5"]),
    ("RIA 2:4", ["--method", "ria", "--pattern", "2:4"]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=100, help="examples per zero-shot task")
    parser.add_argument("--ppl-windows", type=int, default=40, help="WikiText-2 windows of 512 tokens")
    parser.add_argument("--variants", help="comma-separated labels: measure only these (own section)")
    args = parser.parse_args()
    chosen = VARIANTS
    if args.variants:
        wanted = [label.strip() for label in args.variants.split(",")]
        unknown = [label for label in wanted if label not in dict(VARIANTS)]
        if unknown:
            sys.exit(f"unknown variants {unknown}; choose from: {', '.join(label for label, _ in VARIANTS)}")
        chosen = [(label, flags) for label, flags in VARIANTS if label in wanted]
    model = build()
    work = Path(tempfile.mkdtemp())
    rows = []
    try:
        for label, flags in chosen:
            print(f"{label} ...", flush=True)
            target, seconds = model, None
            if flags is not None:
                target = work / label.replace(" ", "_").replace("%", "").replace(":", "-")
                streamprune(
                    "run", str(model), "--out", str(target), *flags, "--calib", str(C4),
                    "--nsamples", "128", "--seqlen", "512", "--seed", "0", "--quiet",
                )  # fmt: skip
                seconds = json.loads((target / "streamprune.json").read_text())["total_seconds"]
            ppl, tasks = evaluate(target, work, args.ppl_windows, args.limit)
            rows.append((label, ppl, tasks, seconds))
            print(f"  ppl {ppl:.2f}, average acc {tasks['average_acc']:.4f}", flush=True)
    finally:
        shutil.rmtree(work)

    options = f" --limit {args.limit} --ppl-windows {args.ppl_windows}" if (args.limit, args.ppl_windows) != (100, 40) else ""
    options += f' --variants "{args.variants}"' if args.variants else ""
    lines = [
        "## Quality of pruned SmolLM2-135M (streamed evaluation)"
        + (": variants measured on their own, as for the quality table" if args.variants else ""),
        "",
        f"Command: `python benchmarks/quality.py{options}`."
        + " Pruning: calibration 128 x 512 tokens of `c4/c4_validation_2k.jsonl.gz`, seed 0, CPU, float32, "
        "micro-batch 1; pruning time is the run record's total_seconds. Perplexity: WikiText-2 test "
        "(`wiki.test.raw`), non-overlapping 512-token windows, the "
        f"first {args.ppl_windows}. Zero-shot: `acc` of lm-evaluation-harness's prompts, the first {args.limit} "
        f"examples of each task (a sample: one standard error is up to {50 / args.limit**0.5:.0f} points at "
        f"n={args.limit}). "
        "Average: mean `acc` of the seven tasks.",
        "",
        conditions(),
        "",
        "| variant | WikiText-2 ppl | " + " | ".join(TASKS) + " | average | pruning time |",
        "|---|---:|" + "---:|" * len(TASKS) + "---:|---:|",
    ]
    for label, ppl, tasks, seconds in rows:
        accs = " | ".join(f"{100 * tasks['tasks'][t]['acc']:.1f}" for t in TASKS)
        took = "-" if seconds is None else f"{seconds:.0f} s"
        lines.append(f"| {label} | {ppl:.2f} | {accs} | {100 * tasks['average_acc']:.1f} | {took} |")
    body = "\n".join(lines)
    write_section("quality-added" if args.variants else "quality", body)


if __name__ == "__main__":
    main()
