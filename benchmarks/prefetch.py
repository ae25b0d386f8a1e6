"""Wall time of `streamprune eval` and `streamprune depth` on SmolLM2-135M (CPU, float32) with the
layer prefetch (--overlap, the default: the next decoder layer is read on a background thread while
the current one computes) and without it (--no-overlap: layers read synchronously, one after
another, which is how eval and depth worked before the prefetch existed).

Workloads, each a separate process `python -m streamprune ...` timed from start to exit (imports,
tokenizing and calibration sampling included) with time.perf_counter around subprocess.run:

  eval        eval SMOL --ppl wiki.test.raw --seqlen 512 --limit 40 --quiet    (40 x 512 tokens)
  depth bi    depth SMOL --criterion bi --scores-only --calib C4 --nsamples 10 --seqlen 128 --out NEW --quiet
  depth ppl   the same with --criterion ppl
  depth bi, 1 thread   depth bi with OMP_NUM_THREADS=1 (torch computes on one thread): a control,
              cheap, for whether a gap between the variants comes from the reads or from the
              2-thread compute on a machine whose cores other work is using too

all with --device cpu --dtype float32 (SmolLM2 is stored in float32, so that changes nothing here),
eval also with --output (to check the perplexity) and each depth run with a fresh --out. Beside the
whole process, the time the command measures itself: eval's `seconds` (from its --output JSON) and
depth's `scoring_seconds` (depth_scores.json).

The checkpoint (538 MB) is read once before the first timed run, so every run finds it in the page
cache. In each round every workload runs once with --overlap and once with --no-overlap, the order
swapped from one round to the next; --repeats rounds; medians compared, and the ratio
no-overlap / overlap of those medians: timings on a shared machine drift, ratios measured side by
side drift less. Also checked: both variants give the same perplexity and the same block scores.

    python benchmarks/prefetch.py [--repeats 3]      # about 50 minutes on 2 cores

Writes its table to benchmarks/RESULTS.md (section "prefetch").
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # the real test models' builders
from common import C4, DATA, conditions, write_section  # noqa: E402
from smollm2 import build  # noqa: E402
from walltime import timed  # noqa: E402

VARIANTS = {"overlap": "--overlap", "no overlap": "--no-overlap"}

# the most the prefetch can hide: every tensor of the checkpoint read once with streamprune's reader
READ_ONLY = """
import sys, time
from pathlib import Path
from streamprune.checkpoint import Checkpoint
checkpoint = Checkpoint(Path(sys.argv[1]))
started = time.perf_counter()
for name in checkpoint.tensors:
    checkpoint.read(name)
print(time.perf_counter() - started)
"""


def workloads(smol: Path) -> dict[str, list[str]]:
    """The commands, without --overlap/--no-overlap and without the per-run --out/--output."""
    streamprune = [sys.executable, "-m", "streamprune"]
    cpu = ["--device", "cpu", "--dtype", "float32", "--quiet"]
    depth = [*streamprune, "depth", str(smol), "--scores-only", "--calib", str(C4), "--nsamples", "10",
             "--seqlen", "128", *cpu]  # fmt: skip
    return {
        "eval": [*streamprune, "eval", str(smol), "--ppl", str(DATA / "wikitext2" / "wiki.test.raw"),
                 "--seqlen", "512", "--limit", "40", *cpu],  # fmt: skip
        "depth bi": [*depth, "--criterion", "bi"],
        "depth ppl": [*depth, "--criterion", "ppl"],
        # a control: the same with one compute thread, where a busy core cannot stall the other
        "depth bi, 1 thread": ["env", "OMP_NUM_THREADS=1", *depth, "--criterion", "bi"],
    }


def run_once(name: str, command: list[str], flag: str, out: Path) -> tuple[float, float, object, float | None]:
    """(whole-process seconds, seconds the command measured itself, its result: the perplexity or
    the block scores, bytes read / checkpoint bytes where it reports them) of one run; `out` is a
    fresh path for its output."""
    if name.startswith("eval"):
        seconds, _ = timed([*command, flag, "--output", str(out)])
        record = json.loads(out.read_text())
        return seconds, record["seconds"], record["perplexity"]["ppl"], None
    seconds, _ = timed([*command, flag, "--out", str(out)])
    report = json.loads((out / "depth_scores.json").read_text())
    reads = report["bytes_read"] / report["checkpoint_bytes"]
    return seconds, report["scoring_seconds"], [block["score"] for block in report["blocks"]], reads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs every workload both ways")
    args = parser.parse_args()
    smol = build()
    for shard in sorted(smol.glob("*.safetensors")):  # into the page cache, before the first timed run
        with shard.open("rb") as f:
            while f.read(1 << 24):
                pass
    commands = workloads(smol)
    whole = {(w, v): [] for w in commands for v in VARIANTS}
    inside = {(w, v): [] for w in commands for v in VARIANTS}
    results = {(w, v): [] for w in commands for v in VARIANTS}
    read_only: list[float] = []
    reads: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="streamprune-prefetch-"))
    try:
        runs = 0
        for repeat in range(args.repeats):
            order = list(VARIANTS) if repeat % 2 == 0 else list(reversed(VARIANTS))
            _, out = timed([sys.executable, "-c", READ_ONLY, str(smol)])
            read_only.append(float(out.strip().splitlines()[-1]))
            print(f"round {repeat + 1} of {args.repeats}: reading the checkpoint alone {read_only[-1]:.2f} s")
            sys.stdout.flush()
            for name, command in commands.items():
                for variant in order:
                    runs += 1
                    print(f"round {repeat + 1} of {args.repeats}: {name}, {variant} ...", flush=True)
                    out = work / f"run{runs}" / ("eval.json" if name.startswith("eval") else "out")
                    out.parent.mkdir()
                    seconds, own, result, read = run_once(name, command, VARIANTS[variant], out)
                    if read is not None:
                        reads[name] = read
                    shutil.rmtree(out.parent)
                    whole[name, variant].append(seconds)
                    inside[name, variant].append(own)
                    results[name, variant].append(result)
                    print(f"  {seconds:.1f} s (inside the command {own:.1f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(table: dict, name: str, variant: str) -> float:
        return statistics.median(table[name, variant])

    lines = [
        "## Layer prefetch: wall time of `streamprune eval` and `streamprune depth` (SmolLM2-135M, CPU)",
        "",
        f"Command: `python benchmarks/prefetch.py --repeats {args.repeats}`. overlap: the default, the next "
        "decoder layer read on a background thread while the current one computes; `--no-overlap`: layers "
        "read synchronously one after another, the reading eval and depth had before the prefetch. "
        "Workloads (all `--device cpu --dtype float32 --quiet`): eval = `eval --ppl wiki.test.raw --seqlen 512 "
        "--limit 40` (40 x 512 WikiText-2 tokens); depth bi / depth ppl = `depth --criterion bi|ppl "
        "--scores-only --calib c4_validation_2k.jsonl.gz --nsamples 10 --seqlen 128` (fresh `--out` each run); "
        "depth bi, 1 thread = depth bi with `OMP_NUM_THREADS=1` (torch computes on one thread; every other row on "
        "2), a control for whether a gap comes from the reads or from the 2-thread compute. "
        "Whole process: each run a separate process timed from start to exit (imports included); inside: the "
        "time the command reports itself (eval's `seconds`, depth's `scoring_seconds`). The checkpoint is in "
        "the page cache (read once before the first run). Each round runs every workload both ways, the order "
        "swapped each round; medians over the rounds. This is a shared 2-core machine, busy with other work at "
        "the same time: single timings are noisy, compare the ratio no-overlap / overlap measured side by side "
        "in this run.",
        "",
        conditions(),
        "",
        "| workload | overlap runs (s) | --no-overlap runs (s) | median overlap | median --no-overlap | "
        "**no-overlap / overlap** | inside: overlap / --no-overlap medians | inside ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in commands:
        fast, slow = median(whole, name, "overlap"), median(whole, name, "no overlap")
        fast_in, slow_in = median(inside, name, "overlap"), median(inside, name, "no overlap")
        lines.append(
            f"| {name} | {', '.join(f'{v:.1f}' for v in whole[name, 'overlap'])} "
            f"| {', '.join(f'{v:.1f}' for v in whole[name, 'no overlap'])} | {fast:.1f} s | {slow:.1f} s "
            f"| **{slow / fast:.3f}** | {fast_in:.1f} s / {slow_in:.1f} s | {slow_in / fast_in:.3f} |"
        )
    same = {
        name: all(r == results[name, "overlap"][0] for v in VARIANTS for r in results[name, v]) for name in commands
    }
    lines += [
        "",
        f"- Reading the whole checkpoint (538 MB) once with streamprune's reader, nothing else: "
        f"{', '.join(f'{v:.2f}' for v in read_only)} s (median {statistics.median(read_only):.2f} s); eval reads "
        "every layer once, "
        + "; ".join(f"{name} {times:.2f} times the checkpoint" for name, times in reads.items())
        + " (their reports). The prefetch can hide at most those reads: where --no-overlap is slower by more, "
        "its compute ran slower, not only its reads.",
        "- Same results with and without the prefetch, in every run: "
        + ", ".join(f"{name} {'yes' if ok else '**no**'}" for name, ok in same.items())
        + f" (eval perplexity {results['eval', 'overlap'][0]:.4f}; depth: every block's score equal).",
    ]
    body = "\n".join(lines)
    write_section("prefetch", body)


if __name__ == "__main__":
    main()
