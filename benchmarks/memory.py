"""Peak memory of `streamprune run`: flat in model depth, and below the checkpoint's size.

Every figure is the peak resident set size of a separate process, read from /usr/bin/time -v:

  baseline  python importing streamprune, torch and transformers and loading the tokenizer: the
            fixed cost of the runtime, paid by any model of any size
  SmolLM2   SmolLM2-135M (float32, 538 MB of safetensors), Wanda 50%, 128 x 512 C4 tokens
  synthetic random Llama models of equal width (hidden 1024, intermediate 2816, 16 heads, 4 KV
            heads, float32) and 8 or 32 layers, Wanda 50%, 16 x 256 C4 tokens; and `streamprune
            eval` of 16 x 256 WikiText-2 tokens on each

    python benchmarks/memory.py [--part run|eval|all]      # about 8 minutes on 2 cores

Writes its table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import C4, DATA, conditions, dir_bytes, max_rss_bytes, write_section  # noqa: E402
from smollm2 import DEFAULT_CACHE, build  # noqa: E402

MIB = 2**20
SYNTHETIC = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4)


def synthetic_model(layers: int, tokenizer_dir: Path) -> Path:
    """A random float32 Llama of `layers` layers (tied embeddings, SmolLM2's tokenizer), cached."""
    out = DEFAULT_CACHE / f"synthetic-llama-h1024-l{layers}"
    if (out / "model.safetensors.index.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    torch.manual_seed(layers)
    config = LlamaConfig(
        vocab_size=49152, num_hidden_layers=layers, tie_word_embeddings=True, max_position_embeddings=2048, **SYNTHETIC
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    staged = Path(tempfile.mkdtemp(dir=DEFAULT_CACHE))
    model.save_pretrained(staged, max_shard_size="200MB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staged)
    staged.rename(out)
    return out


def run_rss(model: Path, nsamples: int, seqlen: int) -> int:
    out = Path(tempfile.mkdtemp()) / "out"
    try:
        return max_rss_bytes(
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
            ]
        )
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


def measure_eval(smol: Path, repeats: int = 3) -> None:
    """Peak RSS of `streamprune eval` on 8 and 32 layers; repeated, because one process's peak
    varies by ~100 MiB from run to run (tokenizing the whole WikiText-2 text dominates it)."""
    peaks = {}
    for layers in (8, 32):
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
    lines += ["", f"Depth: 32 vs 8 layers, ratio of medians **{median[32] / median[8]:.3f}**."]
    body = "\n".join(lines)
    print(body)
    write_section("memory-eval", body)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["run", "eval", "all"], default="all")
    part = parser.parse_args().part
    smol = build()
    if part in ("eval", "all"):
        measure_eval(smol)
    if part == "eval":
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
    for label, model, nsamples, seqlen in [
        ("SmolLM2-135M, 30 layers", smol, 128, 512),
        ("synthetic, 8 layers", synthetic_model(8, smol), 16, 256),
        ("synthetic, 32 layers", synthetic_model(32, smol), 16, 256),
    ]:
        print(f"measuring {label} ...", flush=True)
        peak = run_rss(model, nsamples, seqlen)
        rows.append((label, dir_bytes(model), nsamples, seqlen, peak))

    lines = [
        "## Peak memory of `streamprune run` (Wanda 50%, CPU, float32)",
        "",
        "Command: `python benchmarks/memory.py`. Peak RSS of each process from `/usr/bin/time -v`.",
        "",
        conditions(),
        "",
        f"Runtime baseline (python + torch + transformers + tokenizer, no model): **{baseline / MIB:.0f} MiB**.",
        "",
        "| model | checkpoint | calibration | peak RSS | peak RSS - baseline | peak RSS / checkpoint |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, size, nsamples, seqlen, peak in rows:
        lines.append(
            f"| {label} | {size / MIB:.0f} MiB | {nsamples} x {seqlen} | {peak / MIB:.0f} MiB | "
            f"{(peak - baseline) / MIB:.0f} MiB | {peak / size:.2f} |"
        )
    shallow, deep = rows[1][4], rows[2][4]
    lines += [
        "",
        f"Depth: 32 layers vs 8 layers of equal width: peak RSS ratio **{deep / shallow:.3f}** "
        f"({(deep - shallow) / MIB:+.0f} MiB) while the checkpoint grows {rows[2][1] / rows[1][1]:.1f}x.",
    ]
    body = "\n".join(lines)
    print(body)
    write_section("memory", body)


if __name__ == "__main__":
    main()
