"""Peak memory of `streamprune run` and `streamprune eval`: flat in model depth, and as planned.

Every figure is the peak resident set size of a separate process, read from /usr/bin/time -v:

  baseline  python importing streamprune, torch and transformers and loading the tokenizer: the
            fixed cost of the runtime, paid by any model of any size
  synthetic random Llama models of equal width (hidden 1024, intermediate 2816, 16 heads, 4 KV
            heads, float32) and 8, 16, 32 and 64 layers: `streamprune run` (Wanda 50%, 16 x 256 C4
            tokens) and `streamprune eval` (16 x 256 WikiText-2 tokens)
  SmolLM2   SmolLM2-135M (float32, 538 MB of safetensors), Wanda 50%, 128 x 512 C4 tokens, with the
            activation buffer in RAM and with --offload disk
  wide      3 layers of Llama-2-7B's geometry (float32, 0.81 GB a layer), 4 x 128 C4 tokens: the
            plan where the layers, not the runtime, make the peak
  methods   SparseGPT and SparseGPT + OWL beside Wanda: synthetic 8 and 32 layers, and 3 layers of
            Llama-2-7B's geometry (where the Hessians are large)
  eval offload  `streamprune eval` of SmolLM2-135M, 200 x 512 WikiText-2 tokens (a 225 MiB
            activation buffer), with the buffer in RAM and with --offload-dir (a file)

Beside each run's measured peak, the peak its plan predicted (the run record's plan, computed before
the run from config.json and the runtime's resident size at that moment).

    python benchmarks/memory.py [--part run|eval|eval-offload|wide|methods|reconstruct|heal|all]   # over an hour on 2 cores

Writes its tables to benchmarks/RESULTS.md, one section per part (memory, memory-eval,
memory-eval-offload, memory-wide, memory-methods).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # the real test models' builders
from common import C4, DATA, conditions, dir_bytes, max_rss_bytes, write_section  # noqa: E402
from smollm2 import DEFAULT_CACHE, build  # noqa: E402

MIB = 2**20
DEPTHS = (8, 16, 32, 64)
# Llama-2-7B's layer geometry: one float32 layer is 0.8 GB, so the layer terms, not the runtime, make the peak
WIDE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
SYNTHETIC = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4)


def synthetic_model(layers: int, tokenizer_dir: Path, geometry: dict = SYNTHETIC, name: str = "h1024",
                    dtype: str = "float32") -> Path:  # fmt: skip
    """A random Llama of `layers` layers in `dtype` (tied embeddings, SmolLM2's tokenizer), cached."""
    out = DEFAULT_CACHE / f"synthetic-llama-{name}-l{layers}"
    if (out / "model.safetensors.index.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    torch.manual_seed(layers)
    config = LlamaConfig(
        vocab_size=49152, num_hidden_layers=layers, tie_word_embeddings=True, max_position_embeddings=2048, **geometry
    )
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    staged = Path(tempfile.mkdtemp(dir=DEFAULT_CACHE))
    model.save_pretrained(staged, max_shard_size="200MB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staged)
    staged.rename(out)
    return out


def run_rss(model: Path, nsamples: int, seqlen: int, *extra: str) -> tuple[int, int]:
    """(measured, planned) peak RSS of one `streamprune run`."""
    out = Path(tempfile.mkdtemp()) / "out"
    try:
        measured = max_rss_bytes(
            [
                sys.executable,
                "-m",
                "streamprune",
                "run",
                str(model),
                "--out",
                str(out),
                "--calib",
                str(C4),
                "--nsamples",
                str(nsamples),
                "--seqlen",
                str(seqlen),
                "--quiet",
                *extra,
            ]
        )
        planned = json.loads((out / "streamprune.json").read_text())["plan"]["peak_ram_bytes"]
        return measured, planned
    finally:
        shutil.rmtree(out.parent)


def eval_rss(model: Path) -> int:
    """`streamprune eval` of 16 WikiText-2 windows of 256 tokens."""
    return max_rss_bytes(
        [
            sys.executable, "-m", "streamprune", "eval", str(model), "--ppl", str(DATA / "wikitext2" / "wiki.test.raw"),
            "--seqlen", "256", "--limit", "16", "--quiet",
        ]
    )  # fmt: skip


def measure_eval(smol: Path, repeats: int = 2) -> None:
    """Peak RSS of `streamprune eval` on 8 to 64 layers; repeated, because one process's peak
    varies from run to run (tokenizing the whole WikiText-2 text is most of it)."""
    peaks = {}
    for layers in DEPTHS:
        print(f"measuring eval, synthetic {layers} layers x{repeats} ...", flush=True)
        peaks[layers] = sorted(eval_rss(synthetic_model(layers, smol)) for _ in range(repeats))
    median = {layers: values[len(values) // 2] for layers, values in peaks.items()}
    lines = [
        "## Peak memory of `streamprune eval` (CPU, float32)",
        "",
        "Command: `python benchmarks/memory.py --part eval`. `streamprune eval --ppl wiki.test.raw --seqlen 256 "
        f"--limit 16` (16 x 256 tokens) on the synthetic models above, {repeats} runs each, peak RSS from "
        "`/usr/bin/time -v`.",
        "",
        conditions(),
        "",
        "| model | runs (MiB) | median |",
        "|---|---|---:|",
    ]
    for layers, values in peaks.items():
        lines.append(
            f"| synthetic, {layers} layers | {', '.join(f'{v / MIB:.0f}' for v in values)} | "
            f"{median[layers] / MIB:.0f} MiB |"
        )
    spread = max(median.values()) / min(median.values())
    lines += ["", f"Depth: 8 to 64 layers, largest / smallest median peak **{spread:.3f}** (bar: within 1.10)."]
    body = "\n".join(lines)
    write_section("memory-eval", body)


# WikiText-2 windows of 512 tokens for the --offload-dir comparison: 200 x 512 x 576 float32 is a
# 225 MiB buffer; at 40 windows (45 MiB) the difference drowns in the run-to-run spread of the peak
OFFLOAD_WINDOWS = 200


def measure_eval_offload(smol: Path, windows: int = OFFLOAD_WINDOWS) -> None:
    """Peak RSS of `streamprune eval` of SmolLM2-135M with the activation buffer in RAM and with
    --offload-dir: the offloaded buffer is a mapped file whose pages are dropped as they are written
    (embedding, each layer, the head), so it should not count in the peak."""
    hidden = json.loads((smol / "config.json").read_text())["hidden_size"]
    buffer_bytes = windows * 512 * hidden * 4
    command = [
        sys.executable, "-m", "streamprune", "eval", str(smol), "--ppl", str(DATA / "wikitext2" / "wiki.test.raw"),
        "--seqlen", "512", "--limit", str(windows), "--device", "cpu", "--dtype", "float32", "--quiet",
    ]  # fmt: skip
    rows = []
    for label in ("buffer in RAM", "--offload-dir"):
        print(f"measuring eval of SmolLM2-135M, {windows} windows, {label} ...", flush=True)
        if label == "buffer in RAM":
            rows.append((label, max_rss_bytes(command)))
            continue
        offload = Path(tempfile.mkdtemp(prefix="streamprune-offload-"))
        try:
            rows.append((label, max_rss_bytes([*command, "--offload-dir", str(offload)])))
        finally:
            shutil.rmtree(offload)
    (_, in_ram), (_, offloaded) = rows
    lines = [
        "## Peak memory of `streamprune eval --offload-dir` (SmolLM2-135M, CPU, float32)",
        "",
        "Command: `python benchmarks/memory.py --part eval-offload`. `streamprune eval --ppl wiki.test.raw "
        f"--seqlen 512 --limit {windows} --device cpu --dtype float32` ({windows} x 512 = {windows * 512:,} "
        f"tokens; activation buffer {windows * 512:,} x {hidden} x 4 bytes = **{buffer_bytes / MIB:.0f} MiB**), "
        "once with the buffer in RAM and once with `--offload-dir` (a temporary directory on the local disk); "
        "one run each, peak RSS from `/usr/bin/time -v`."
        + (
            f" {windows} windows rather than 40: at 40 the buffer is 45 MiB, too small against the run-to-run "
            "spread of the peak."
            if windows > 40
            else ""
        ),
        "",
        conditions(),
        "",
        "| activation buffer | peak RSS |",
        "|---|---:|",
    ]
    for label, peak in rows:
        lines.append(f"| {label} | {peak / MIB:.0f} MiB |")
    lines += [
        "",
        f"In RAM minus offloaded: **{(in_ram - offloaded) / MIB:.0f} MiB** "
        f"({(in_ram - offloaded) / buffer_bytes:.2f}x the {buffer_bytes / MIB:.0f} MiB buffer).",
    ]
    body = "\n".join(lines)
    write_section("memory-eval-offload", body)


def measure_wide(smol: Path) -> None:
    """The plan where the layers, not the runtime, make the peak: 3 layers of Llama-2-7B's geometry
    (the middle one is the steady state: the next layer is being read and the previous one written)."""
    model = synthetic_model(3, smol, WIDE, "7b-geometry")
    rows = []
    for label, extra in [("activations in RAM", ()), ("--offload disk", ("--offload", "disk"))]:
        print(f"measuring 7B-geometry layers, {label} ...", flush=True)
        rows.append((label, *run_rss(model, 4, 128, *extra)))
    lines = [
        "## Peak memory where the layers make the peak: 3 layers of Llama-2-7B's geometry (float32)",
        "",
        "Command: `python benchmarks/memory.py --part wide`. A random float32 Llama with hidden 4096, "
        "intermediate 11008, 32 heads (one layer 0.81 GB), Wanda 50%, 4 x 128 C4 tokens, CPU; peak RSS from "
        "`/usr/bin/time -v`, planned from the run record.",
        "",
        conditions(),
        "",
        "| run | peak RSS | planned | planned / measured |",
        "|---|---:|---:|---:|",
    ]
    for label, measured, planned in rows:
        lines.append(f"| {label} | {measured / MIB:.0f} MiB | {planned / MIB:.0f} MiB | {planned / measured:.3f} |")
    body = "\n".join(lines)
    write_section("memory-wide", body)


def measure_methods(smol: Path) -> None:
    """SparseGPT and OWL beside Wanda on the same work: flat in depth (8 vs 32 synthetic layers),
    and as planned where the Hessians count (3 layers of Llama-2-7B's geometry: down_proj's H alone
    is 11008^2 x 4 B = 462 MiB)."""
    runs = [
        (f"synthetic, {n} layers", synthetic_model(n, smol), 16, 256) for n in (8, 32)
    ] + [("7B-geometry, 3 layers", synthetic_model(3, smol, WIDE, "7b-geometry"), 4, 128)]
    methods = [("Wanda 50%", ()), ("SparseGPT 50%", ("--method", "sparsegpt")),
               ("SparseGPT 50% + OWL", ("--method", "sparsegpt", "--allocation", "owl"))]  # fmt: skip
    rows = []
    for model_label, model, nsamples, seqlen in runs:
        for method_label, extra in methods:
            if "OWL" in method_label and model_label.startswith("7B"):
                continue  # the outlier pass holds no Hessian: the synthetic depths show its cost
            print(f"measuring {method_label} on {model_label} ...", flush=True)
            started = time.perf_counter()
            measured, planned = run_rss(model, nsamples, seqlen, *extra)
            rows.append((model_label, method_label, nsamples, seqlen, measured, planned, time.perf_counter() - started))
    lines = [
        "## Peak memory and wall time of SparseGPT and OWL beside Wanda (CPU, float32), measured and planned",
        "",
        "Command: `python benchmarks/memory.py --part methods`. Peak RSS of each process from `/usr/bin/time -v`; "
        "planned: the run record's plan; wall time of the whole process (one run each, shared machine: "
        "compare within a model).",
        "",
        conditions(),
        "",
        "| model | method | calibration | peak RSS | planned | planned / measured | wall time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model_label, method_label, nsamples, seqlen, measured, planned, seconds in rows:
        lines.append(
            f"| {model_label} | {method_label} | {nsamples} x {seqlen} | {measured / MIB:.0f} MiB | "
            f"{planned / MIB:.0f} MiB | {planned / measured:.3f} | {seconds:.0f} s |"
        )
    for method_label, _ in methods:
        peaks = {row[0]: row[4] for row in rows if row[1] == method_label}
        ratio = peaks["synthetic, 32 layers"] / peaks["synthetic, 8 layers"]
        lines.append(f"\n- {method_label}: peak RSS at 32 layers / at 8 layers **{ratio:.3f}** (bar: within 1.10).")
    worst = max(abs(row[5] / row[4] - 1) for row in rows if row[1] != "Wanda 50%")
    lines.append(f"- SparseGPT runs: largest plan error against the measured peak **{100 * worst:.1f}%** (bar: 15%).")
    write_section("memory-methods", "\n".join(lines))


def measure_reconstruct(smol: Path) -> None:
    """--reconstruct holds one layer's training state and a second (dense-stream) buffer: flat in
    depth too (8 vs 32 synthetic layers, the same calibration)."""
    rows = []
    for layers in (8, 32):
        model = synthetic_model(layers, smol)
        for label, extra in (("Wanda 50%", ()), ("Wanda 50% + reconstruct", ("--reconstruct",))):
            print(f"measuring {label} on {layers} layers ...", flush=True)
            started = time.perf_counter()
            measured, planned = run_rss(model, 16, 256, *extra)
            rows.append((layers, label, measured, planned, time.perf_counter() - started))
    lines = [
        "## Peak memory of block reconstruction (`run --reconstruct`, CPU, float32), 8 vs 32 layers",
        "",
        "Command: `python benchmarks/memory.py --part reconstruct`. Synthetic float32 Llama (hidden 1024), "
        "calibration 16 x 256; --reconstruct with its defaults (4 epochs, batch 1, Adam). Peak RSS of each "
        "process from `/usr/bin/time -v`; planned: the run record's plan (one run each, shared machine).",
        "",
        conditions(),
        "",
        "| layers | run | peak RSS | planned | planned / measured | wall time |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for layers, label, measured, planned, seconds in rows:
        lines.append(f"| {layers} | {label} | {measured / MIB:.0f} MiB | {planned / MIB:.0f} MiB | "
                     f"{planned / measured:.3f} | {seconds:.0f} s |")  # fmt: skip
    peaks = {(row[0], row[1]): row[2] for row in rows}
    ratio = peaks[(32, "Wanda 50% + reconstruct")] / peaks[(8, "Wanda 50% + reconstruct")]
    lines.append(f"\n- With --reconstruct: peak RSS at 32 layers / at 8 layers **{ratio:.3f}** (bar: within 1.10).")
    write_section("memory-reconstruct", "\n".join(lines))


def measure_heal(smol: Path) -> None:
    """`streamprune heal`'s peak RSS on SmolLM2-135M (2 steps; the peak is reached in the first)
    against `plan --heal`, with and without gradient checkpointing, batches of 1 and 2 x 512."""
    rows = []
    for checkpointing in ("--gradient-checkpointing", "--no-gradient-checkpointing"):
        for batch in (1, 2):
            flags = ["--batch-size", str(batch), "--seqlen", "512", "--base", "fp32", checkpointing]
            plan = subprocess.run([sys.executable, "-m", "streamprune", "plan", str(smol), "--heal", "--device", "cpu",
                                   "--json", *flags], capture_output=True, text=True, check=True)  # fmt: skip
            planned = json.loads(plan.stdout)["peak_bytes"]
            out = Path(tempfile.mkdtemp()) / "out"
            try:
                measured = max_rss_bytes([sys.executable, "-m", "streamprune", "heal", str(smol), "--out", str(out),
                                          "--data", str(C4), "--steps", "2", "--quiet", *flags])  # fmt: skip
            finally:
                shutil.rmtree(out.parent)
            rows.append((checkpointing.removeprefix("--"), batch, measured, planned))
            print(f"heal {checkpointing} batch {batch}: {measured / MIB:.0f} MiB, planned {planned / MIB:.0f}", flush=True)
    lines = [
        "## Peak memory of `streamprune heal` (SmolLM2-135M, CPU, fp32 base), measured and planned",
        "",
        "Command: `python benchmarks/memory.py --part heal`. Two LoRA steps of 512-token sequences (rank 16); "
        "peak RSS of the process from `/usr/bin/time -v`; planned: `streamprune plan --heal --device cpu` with "
        "the same flags.",
        "",
        conditions(),
        "",
        "| gradient checkpointing | batch | peak RSS | planned | planned / measured |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {gc} | {batch} | {measured / MIB:.0f} MiB | {planned / MIB:.0f} MiB | {planned / measured:.3f} |"
              for gc, batch, measured, planned in rows]  # fmt: skip
    write_section("memory-heal", "\n".join(lines))


# the parts besides "run" (measured last, in main), in the order "all" measures them
PARTS = {"heal": measure_heal, "reconstruct": measure_reconstruct, "methods": measure_methods, "wide": measure_wide,
         "eval-offload": measure_eval_offload, "eval": measure_eval}  # fmt: skip


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=[*PARTS, "run", "all"], default="all")
    part = parser.parse_args().part
    smol = build()
    for name, measure in PARTS.items():
        if part in (name, "all"):
            measure(smol)
    if part not in ("run", "all"):
        return
    baseline = max_rss_bytes(
        [
            sys.executable,
            "-c",
            "import sys, streamprune.pipeline; from streamprune.families import FAMILIES; "
            "from transformers import AutoTokenizer; FAMILIES['llama'].classes(); "
            "AutoTokenizer.from_pretrained(sys.argv[1])",
            str(smol),
        ]
    )
    rows = []
    for label, model, nsamples, seqlen, extra in [
        *[(f"synthetic, {n} layers", synthetic_model(n, smol), 16, 256, ()) for n in DEPTHS],
        ("SmolLM2-135M, 30 layers", smol, 128, 512, ()),
        ("SmolLM2-135M, --offload disk", smol, 128, 512, ("--offload", "disk")),
    ]:
        print(f"measuring {label} ...", flush=True)
        measured, planned = run_rss(model, nsamples, seqlen, *extra)
        rows.append((label, dir_bytes(model), nsamples, seqlen, measured, planned))

    lines = [
        "## Peak memory of `streamprune run` (Wanda 50%, CPU, float32), measured and planned",
        "",
        "Command: `python benchmarks/memory.py --part run`. Peak RSS of each process from `/usr/bin/time -v`; "
        "planned: the run record's plan (`streamprune plan` gives the same from config.json).",
        "",
        conditions(),
        "",
        f"Runtime baseline (python + torch + transformers + tokenizer, no model): **{baseline / MIB:.0f} MiB**.",
        "",
        "| model | checkpoint | calibration | peak RSS | planned | planned / measured |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, size, nsamples, seqlen, measured, planned in rows:
        lines.append(
            f"| {label} | {size / MIB:.0f} MiB | {nsamples} x {seqlen} | {measured / MIB:.0f} MiB | "
            f"{planned / MIB:.0f} MiB | {planned / measured:.3f} |"
        )
    synthetic = [row[4] for row in rows[: len(DEPTHS)]]
    worst = max(abs(row[5] / row[4] - 1) for row in rows)
    lines += [
        "",
        f"- Depth: 8 to 64 layers of equal width, largest / smallest peak RSS "
        f"**{max(synthetic) / min(synthetic):.3f}** "
        f"(bar: within 1.10) while the checkpoint grows {rows[len(DEPTHS) - 1][1] / rows[0][1]:.1f}x.",
        f"- Plan: largest error against the measured peak **{100 * worst:.1f}%** (bar: 15%).",
    ]
    body = "\n".join(lines)
    write_section("memory", body)


if __name__ == "__main__":
    main()
