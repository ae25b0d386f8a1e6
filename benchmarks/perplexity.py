"""Perplexity of pruned SmolLM2-135M per method and recipe, under the conditions the methods issue
sets its bars in: calibration 32 x 512 tokens of the C4 documents, seed 0; WikiText-2 test, the
first 40 windows of 512 tokens. Perplexity only (quality.py adds the zero-shot tasks).

    python benchmarks/perplexity.py --variants "SparseGPT 50%,SparseGPT 2:4" --section sparsegpt

Each variant is one `streamprune run` and one `streamprune eval` here; the table (perplexity,
pruning time and peak RSS from the run record) goes to RESULTS.md under `perplexity-SECTION`.
Timings are only comparable within one invocation (this machine is shared).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # the real test models' builders
from common import C4, conditions, perplexity, pick_labels, streamprune, write_section
from smollm2 import build

VARIANTS = {
    "dense": None,
    "magnitude 50%": ["--method", "magnitude", "--sparsity", "0.5"],
    "Wanda 50%": ["--method", "wanda", "--sparsity", "0.5"],
    "Wanda 2:4": ["--method", "wanda", "--pattern", "2:4"],
    "RIA 50%": ["--method", "ria", "--sparsity", "0.5"],
    "RIA 2:4": ["--method", "ria", "--pattern", "2:4"],
    "SparseGPT 50%": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "SparseGPT 2:4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "SparseGPT 4:8": ["--method", "sparsegpt", "--pattern", "4:8"],
    "SparseGPT 50% sequential": ["--method", "sparsegpt", "--sparsity", "0.5", "--sequential"],
    "SparseGPT 2:4 sequential": ["--method", "sparsegpt", "--pattern", "2:4", "--sequential"],
    "Wanda 2:4 sequential": ["--method", "wanda", "--pattern", "2:4", "--sequential"],
    "Wanda 2:4 + reconstruct": ["--method", "wanda", "--pattern", "2:4", "--reconstruct"],
    "SparseGPT 2:4 + reconstruct": ["--method", "sparsegpt", "--pattern", "2:4", "--reconstruct"],
    "SparseGPT 2:4 sequential + reconstruct": ["--method", "sparsegpt", "--pattern", "2:4", "--sequential",
                                               "--reconstruct"],
    "SparseGPT 50% + reconstruct": ["--method", "sparsegpt", "--sparsity", "0.5", "--reconstruct"],
    # the same arithmetic in exact math, rounded otherwise (the forward's and the Hessians' sums): how far
    # rounding alone moves a result
    "SparseGPT 2:4 micro-batch 2": ["--method", "sparsegpt", "--pattern", "2:4", "--batch-size", "2"],
    "SparseGPT 2:4 micro-batch 4": ["--method", "sparsegpt", "--pattern", "2:4", "--batch-size", "4"],
}
# 50%, 60% and 70% unstructured, uniform and OWL, for every method
for _label, _method in (("magnitude", "magnitude"), ("Wanda", "wanda"), ("RIA", "ria"), ("SparseGPT", "sparsegpt")):
    for _percent in (50, 60, 70):
        VARIANTS[f"{_label} {_percent}%"] = ["--method", _method, "--sparsity", f"{_percent / 100}"]
        VARIANTS[f"{_label} {_percent}% OWL"] = [*VARIANTS[f"{_label} {_percent}%"], "--allocation", "owl"]


def main() -> None:
    parser = argparse.ArgumentParser()
    choices = f"comma-separated, from: {', '.join(VARIANTS)}".replace("%", "%%")  # argparse formats help with %
    parser.add_argument("--variants", required=True, help=choices)
    parser.add_argument("--section", required=True, help="RESULTS.md section: perplexity-SECTION")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--device", default="cpu", help="for run and eval: cpu, or cuda where a GPU is")
    args = parser.parse_args()
    wanted = pick_labels(args.variants, VARIANTS, "variants")
    model = build()
    work = Path(tempfile.mkdtemp())
    rows = []
    try:
        for label in wanted:
            print(f"{label} ...", flush=True)
            rows.append(measure(label, model, work, args))
            print(f"  ppl {rows[-1][1]:.2f}", flush=True)
            # after every variant, so that an invocation stopped early keeps what it measured
            # a GPU's table beside the CPU's, not drawn over them by plots.py
            prefix = "perplexity" if args.device == "cpu" else "gpu-perplexity"
            write_section(f"{prefix}-{args.section}", table(rows, args, len(wanted)))
    finally:
        shutil.rmtree(work)


def measure(label: str, model: Path, work: Path, args) -> tuple[str, float, dict | None]:
    """(label, WikiText-2 perplexity, the run record or None for dense) of one variant."""
    target, record = model, None
    if VARIANTS[label] is not None:
        target = work / "pruned"
        streamprune(
            "run", str(model), "--out", str(target), "--force", *VARIANTS[label], "--calib", str(C4),
            "--nsamples", str(args.nsamples), "--seqlen", "512", "--seed", "0", "--quiet", "--device", args.device,
        )  # fmt: skip
        record = json.loads((target / "streamprune.json").read_text())
    return label, perplexity(target, work, args.ppl_windows, "--device", args.device), record


def table(rows: list, args, wanted: int) -> str:
    lines = [
        f"## Perplexity of pruned SmolLM2-135M: {args.section}",
        "",
        f'Command: `python benchmarks/perplexity.py --variants "{args.variants}" --section {args.section}'
        + (f" --nsamples {args.nsamples}" if args.nsamples != 32 else "")
        + (f" --ppl-windows {args.ppl_windows}" if args.ppl_windows != 40 else "")
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + f"`. Calibration {args.nsamples} x 512 tokens of `c4/c4_validation_2k.jsonl.gz`, seed 0, "
        f"{'CPU' if args.device == 'cpu' else args.device}, float32, micro-batch 1 unless the variant names another. Perplexity: WikiText-2 test "
        "(`wiki.test.raw`), non-overlapping 512-token "
        f"windows, the first {args.ppl_windows}. Pruning time and peak RSS: the run record's "
        "total_seconds and peak_rss_bytes (one run each, on a shared machine)."
        + ("" if len(rows) == wanted else f" Measured so far: {len(rows)} of the {wanted} variants asked for."),
        "",
        conditions(),
        "",
        "| variant | WikiText-2 ppl | pruning time | peak RSS | peak VRAM |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, ppl, record in rows:
        took = "-" if record is None else f"{record['total_seconds']:.0f} s"
        rss = "-" if record is None else f"{record['peak_rss_bytes'] / 2**20:.0f} MiB"
        vram = "-" if not (record or {}).get("peak_vram_bytes") else f"{record['peak_vram_bytes'] / 2**20:.0f} MiB"
        lines.append(f"| {label} | {ppl:.2f} | {took} | {rss} | {vram} |")
    for label, _, record in rows:  # OWL's allocation, layer 0 first (benchmarks/plots.py draws it)
        sparsities = (record or {}).get("allocation", {}).get("sparsities")
        if sparsities:
            lines += ["", f"OWL layer sparsities, {label}: " + " ".join(f"{value:.3f}" for value in sparsities)]
    return "\n".join(lines)

if __name__ == "__main__":
    main()
