"""What pruning costs SmolLM2-135M: perplexity and zero-shot accuracy of each variant, streamed.

    python benchmarks/quality.py [--limit 100] [--ppl-windows 40]     # about an hour on 2 CPU cores
    python benchmarks/quality.py --variants "RIA 50%,RIA 2:4"        # only these, in a section of their own
    python benchmarks/quality.py --table methods --limit 50          # every method x sparsity x OWL: hours
    python benchmarks/quality.py --table methods --limit 50 --variants "RIA 50%,RIA 2:4"  # a share of them

--table methods measures the methods issue's table: magnitude, Wanda, RIA and SparseGPT, each at
50%, 60% and 70% unstructured with and without OWL, and at 2:4 and 4:8 (33 variants with dense).
It takes several hours on a CPU, so it goes on where it stopped: every measured row is kept in
benchmarks/quality-methods.json (with the commit it was measured at), and the table in RESULTS.md
(section quality-methods) is rewritten after every variant from all rows measured so far. The 70%
rows are measured first.

Variants: dense | magnitude 50% | Wanda 50% | Wanda 2:4 | Wanda 4:8 | magnitude 2:4 | RIA 50% |
RIA 2:4. With --variants, the table of those rows goes to its own section ("quality-added"), under
the same conditions as the main table, so that a new method gets its rows without re-measuring
the others (whose outputs the golden test keeps byte-identical). Calibration:
128 x 512 tokens of the C4 documents in the data folder (STREAMPRUNE_DATA), seed 0. Perplexity:
WikiText-2 test (wiki.test.raw) at seqlen 512, the first --ppl-windows windows. Zero-shot: the seven tasks, the
first --limit examples of each (the full sets take days on a CPU). Every number comes from
`streamprune run` and `streamprune eval` run here; the table goes to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # the real test models' builders
from common import C4, TASKS, code_version, conditions, evaluate, pick_labels, streamprune, write_section
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
METHOD_VARIANTS = [("dense", None)]
for _label, _method in (("magnitude", "magnitude"), ("Wanda", "wanda"), ("RIA", "ria"), ("SparseGPT", "sparsegpt")):
    for _percent in (50, 60, 70):
        _flags = ["--method", _method, "--sparsity", f"{_percent / 100}"]
        METHOD_VARIANTS += [(f"{_label} {_percent}%", _flags), (f"{_label} {_percent}% OWL", [*_flags, "--allocation", "owl"])]
    METHOD_VARIANTS += [(f"{_label} {n}:{m}", ["--method", _method, "--pattern", f"{n}:{m}"]) for n, m in ((2, 4), (4, 8))]
METHOD_ROWS = Path(__file__).resolve().parent / "quality-methods.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=100, help="examples per zero-shot task")
    parser.add_argument("--ppl-windows", type=int, default=40, help="WikiText-2 windows of 512 tokens")
    parser.add_argument("--variants", help="comma-separated labels: measure only these (own section)")
    parser.add_argument("--table", choices=["main", "methods"], default="main")
    args = parser.parse_args()
    if args.table == "methods":
        return methods_table(args)
    chosen = VARIANTS
    if args.variants:
        wanted = pick_labels(args.variants, dict(VARIANTS), "variants")
        chosen = [(label, flags) for label, flags in VARIANTS if label in wanted]
    model = build()
    work = Path(tempfile.mkdtemp())
    rows = []
    try:
        for label, flags in chosen:
            rows.append(measure(label, flags, model, work, args))
    finally:
        shutil.rmtree(work)
    options = f" --limit {args.limit} --ppl-windows {args.ppl_windows}" if (args.limit, args.ppl_windows) != (100, 40) else ""
    options += f' --variants "{args.variants}"' if args.variants else ""
    title = ": variants measured on their own, as for the quality table" if args.variants else ""
    write_section("quality-added" if args.variants else "quality", table(title, options, rows, args))


def measure(label: str, flags: list[str] | None, model: Path, work: Path, args) -> tuple:
    """(label, perplexity, zero-shot results, pruning seconds or None for dense) of one variant."""
    print(f"{label} ...", flush=True)
    target, seconds = model, None
    if flags is not None:
        target = work / label.replace(" ", "_").replace("%", "").replace(":", "-")
        streamprune(
            "run", str(model), "--out", str(target), *flags, "--calib", str(C4),
            "--nsamples", "128", "--seqlen", "512", "--seed", "0", "--quiet", "--force",
        )  # fmt: skip
        seconds = json.loads((target / "streamprune.json").read_text())["total_seconds"]
    ppl, tasks = evaluate(target, work, args.ppl_windows, args.limit)
    if flags is not None:
        shutil.rmtree(target)  # a float32 SmolLM2 is 0.5 GB; 33 of them would fill the disk
    print(f"  ppl {ppl:.2f}, average acc {tasks['average_acc']:.4f}", flush=True)
    return label, ppl, tasks, seconds


def methods_table(args) -> None:
    """The methods table, going on from the rows benchmarks/quality-methods.json already holds
    (measured with the same --limit and --ppl-windows)."""
    settings = {"limit": args.limit, "ppl_windows": args.ppl_windows}
    if saved_rows(settings) is None:
        sys.exit(f"{METHOD_ROWS} holds rows measured with other settings than {settings}; use those, or move it away")
    model = build()
    work = Path(tempfile.mkdtemp())
    # the 70% rows first (the methods issue reads OWL's effect there), then the rest in table order
    order = sorted(METHOD_VARIANTS, key=lambda variant: "70%" not in variant[0])
    if args.variants:  # a share of the rows: two processes on two cores can each measure their own
        wanted = pick_labels(args.variants, dict(METHOD_VARIANTS), "variants")
        order = [(label, flags) for label, flags in order if label in wanted]
    try:
        for label, flags in order:
            if label in saved_rows(settings)["rows"]:
                continue
            _, ppl, tasks, seconds = measure(label, flags, model, work, args)
            saved = saved_rows(settings)  # read again: another process may have added rows meanwhile
            saved["rows"][label] = {"ppl": ppl, "tasks": tasks, "seconds": seconds, "commit": code_version()}
            scratch = METHOD_ROWS.with_suffix(f".{os.getpid()}.tmp")
            scratch.write_text(json.dumps(saved, indent=1) + "\n")
            os.replace(scratch, METHOD_ROWS)  # whole or not at all: a killed run leaves the rows it had
            rows = [(lbl, r["ppl"], r["tasks"], r["seconds"]) for lbl, _ in METHOD_VARIANTS if (r := saved["rows"].get(lbl))]
            commits = sorted({r["commit"] for r in saved["rows"].values()})
            title = f": every method, with and without OWL ({len(rows)} of {len(METHOD_VARIANTS)} variants measured)"
            options = f" --table methods --limit {args.limit} --ppl-windows {args.ppl_windows}"
            body = table(title, options, rows, args, f"Rows measured at commits {', '.join(commits)}; pruning times from "
                         "different sessions are not comparable with each other.")  # fmt: skip
            write_section("quality-methods", body)
    finally:
        shutil.rmtree(work)


def saved_rows(settings: dict) -> dict | None:
    """The methods table's rows measured so far (none yet: an empty table); None where they were
    measured with other settings."""
    saved = json.loads(METHOD_ROWS.read_text()) if METHOD_ROWS.exists() else {"settings": settings, "rows": {}}
    return saved if saved["settings"] == settings else None


def table(title: str, options: str, rows: list, args, note: str = "") -> str:
    lines = [
        "## Quality of pruned SmolLM2-135M (streamed evaluation)" + title,
        "",
        f"Command: `python benchmarks/quality.py{options}`."
        + " Pruning: calibration 128 x 512 tokens of `c4/c4_validation_2k.jsonl.gz`, seed 0, CPU, float32, "
        "micro-batch 1; pruning time is the run record's total_seconds. Perplexity: WikiText-2 test "
        "(`wiki.test.raw`), non-overlapping 512-token windows, the "
        f"first {args.ppl_windows}. Zero-shot: `acc` of lm-evaluation-harness's prompts, the first {args.limit} "
        f"examples of each task (a sample: one standard error is up to {50 / args.limit**0.5:.0f} points at "
        f"n={args.limit}). "
        "Average: mean `acc` of the seven tasks. " + note,
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
    return "\n".join(lines)


if __name__ == "__main__":
    main()
