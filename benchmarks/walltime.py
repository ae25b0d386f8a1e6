"""Wall time of `streamprune run` on SmolLM2-135M against the whole-model in-memory Wanda reference,
on the same calibration ids, and against pure I/O and pure compute (how well the overlap works).

Each figure is a separate process, timed from start to exit (imports included on both sides):

  streamprune       `streamprune run` (Wanda 50%, float32, batch 1), overlapped I/O (the default)
  no overlap        the same with --no-overlap: read, compute, write one after another
  reference         tests/reference_wanda.py: sample the calibration windows (checked equal to
                    streamprune's), load the whole model, prune it in memory, save_pretrained
  compute only      the reference's pruning loop alone (the model already in memory), timed inside it
  I/O only          every tensor read with streamprune's reader and written with its writer, no compute

The variants alternate, --repeats times, and medians are compared: timings on a shared machine
drift, ratios measured side by side do not.

    python benchmarks/walltime.py [--nsamples 32 --seqlen 512 --repeats 2]   # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # the real test models' builders
from common import C4, ROOT, conditions, write_section  # noqa: E402
from smollm2 import build  # noqa: E402

REFERENCE = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
import torch
sys.path.insert(0, sys.argv[4])
from reference_wanda import load_full_model, wanda_reference
from transformers import AutoTokenizer
from streamprune.calibration import read_documents, sample_windows
saved = json.load(open(sys.argv[2]))
# the reference samples its own calibration windows too (Wanda's get_c4), by the same random draws
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
documents = read_documents(Path(saved["file"]))
ids = sample_windows(documents, tokenizer, saved["nsamples"], saved["seqlen"], saved["seed"])
assert torch.equal(ids, torch.tensor(saved["input_ids"])), "not the same calibration ids"
t1 = time.perf_counter()
model = load_full_model(sys.argv[1])
t2 = time.perf_counter()
wanda_reference(model, ids, sparsity=0.5)
t3 = time.perf_counter()
model.save_pretrained(sys.argv[3], max_shard_size="5GB")
t4 = time.perf_counter()
print(json.dumps({"imports and calibration": t1 - t0, "load": t2 - t1, "compute": t3 - t2, "save": t4 - t3}))
"""

IO_ONLY = """
import sys, time
from pathlib import Path
from streamprune.checkpoint import Checkpoint
from streamprune.writer import CheckpointWriter
source, out = Path(sys.argv[1]), Path(sys.argv[2])
checkpoint = Checkpoint(source)
names = sorted(checkpoint.tensors)
info = checkpoint.tensors
writer = CheckpointWriter(out, [(n, info[n].dtype, info[n].shape) for n in names], 5 * 10**9)
for name in [name for shard in writer.shards for name in shard.entries]:  # the writer's order
    writer.write(name, checkpoint.read(name))
writer.finish()
"""


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    smol = build()
    work = Path(tempfile.mkdtemp(prefix="streamprune-walltime-"))
    prune = [sys.executable, "-m", "streamprune", "run", str(smol), "--calib", str(C4), "--nsamples",
             str(args.nsamples), "--seqlen", str(args.seqlen), "--quiet", "--force"]  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in ("streamprune", "no overlap", "reference", "compute only", "I/O")}
    try:
        for repeat in range(args.repeats):
            print(f"round {repeat + 1} of {args.repeats} ...", flush=True)
            seconds, _ = timed([*prune, "--out", str(work / "sp")])
            times["streamprune"].append(seconds)
            ids = work / "ids.json"
            shutil.copy(work / "sp" / "streamprune_calibration.json", ids)
            seconds, out = timed(
                [sys.executable, "-c", REFERENCE, str(smol), str(ids), str(work / "ref"), str(ROOT / "tests")]
            )
            times["reference"].append(seconds)
            times["compute only"].append(json.loads(out.strip().splitlines()[-1])["compute"])
            seconds, _ = timed([*prune, "--out", str(work / "serial"), "--no-overlap"])
            times["no overlap"].append(seconds)
            shutil.rmtree(work / "io", ignore_errors=True)
            (work / "io").mkdir()
            seconds, _ = timed([sys.executable, "-c", IO_ONLY, str(smol), str(work / "io")])
            times["I/O"].append(seconds)
        record = json.loads((work / "sp" / "streamprune.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    lines = [
        "## Wall time of `streamprune run` vs the in-memory reference (SmolLM2-135M, CPU)",
        "",
        f"Command: `python benchmarks/walltime.py --nsamples {args.nsamples} --seqlen {args.seqlen} "
        f"--repeats {args.repeats}`. Wanda 50%, float32, batch 1, {args.nsamples} x {args.seqlen} C4 "
        "tokens (the reference samples the same windows, checked equal to streamprune's ids). Each figure "
        "is a whole process from start to exit, imports included, except compute only (the reference's "
        "pruning loop alone, timed inside it). Variants alternate; medians of the runs.",
        "",
        conditions(),
        "",
        "| variant | runs (s) | median (s) |",
        "|---|---|---:|",
    ]
    for name, values in times.items():
        lines.append(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {median[name]:.1f} |")
    bound = max(median["compute only"], median["I/O"])
    lines += [
        "",
        f"- streamprune / reference: **{median['streamprune'] / median['reference']:.3f}** (bar: at most 1.1)",
        f"- streamprune / max(compute only, I/O only): {median['streamprune'] / bound:.3f} "
        f"(1.0 would be perfect overlap; the rest is imports, calibration sampling and checks)",
        f"- no overlap / overlap: {median['no overlap'] / median['streamprune']:.3f}",
        f"- the run's own record: {record['total_seconds']:.1f} s inside prune(), peak RSS "
        f"{record['peak_rss_bytes'] / 2**20:.0f} MiB (planned {record['plan']['peak_ram_bytes'] / 2**20:.0f} MiB); "
        f"{record['plan']['bytes_written'] / 2**20:.0f} MiB written (checkpoint + activation checkpoints)",
    ]
    body = "\n".join(lines)
    write_section("walltime", body)


if __name__ == "__main__":
    main()
