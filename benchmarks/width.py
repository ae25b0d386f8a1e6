"""Depth against width: SmolLM2-135M pruned to the same parameter counts by removing whole blocks
(`streamprune depth`, criteria ppl, taylor, bi) and by narrowing every block (`streamprune width`,
criteria flap, wanda-sp), each one-shot and healed with the same LoRA budget (`streamprune heal`),
against the dense model: parameters, WikiText-2 perplexity, zero-shot accuracy, and batch-1 and
batch-16 generation latency, throughput and peak memory in transformers.

    export STREAMPRUNE_DATA=/path/to/data       # the data folder: wikitext2/, c4/, zeroshot/
    python benchmarks/width.py [--limit 5] [--heal-steps 16]    # about 45 minutes on 2 shared CPU cores

Sizes: for each --targets share (0.2, 0.35) of the decoder blocks' parameters, depth removes the
whole-block count whose share is closest (SmolLM2's 30 blocks are equal: k blocks are k/30 of them;
a tie goes to fewer blocks; each criterion scores the blocks once, the second size reuses the scores)
and width gets --ratio equal to the share depth actually removed; both shares are printed, and the
table gives every model's parameter count. Depth: `streamprune depth --remove k` with its defaults
(10 x 128 calibration tokens, seed 1234, blocks 0-3 and the last two kept); width: `streamprune width
--ratio r` on --width-nsamples x 512 calibration tokens (seed 0). Calibration and healing text: the
C4 documents of the data folder (STREAMPRUNE_DATA). Healing: `streamprune heal`, LoRA rank 16,
--heal-steps steps of one --heal-seqlen-token window, lr 1e-3, fp32 base, the same for every pruned
model. Quality: one `streamprune eval --limit N` per model: WikiText-2 test perplexity over the
first N windows of 512 tokens and the seven built-in zero-shot tasks' first N examples each (the
default N=5 is small: it is what keeps the whole benchmark near 40 minutes on 2 shared cores).

Generation: transformers' greedy `generate`, float32, exactly --new-tokens new tokens after a
--prompt-tokens-token prompt (batch 16: sixteen different WikiText-2 windows of that length, no
padding), torch threads fixed (--threads). Each measurement is a fresh process per model: load,
warm up, --repeats timed runs at batch 1, then warm up and --repeats at batch 16; its peak RSS
after the batch-1 runs and after the batch-16 runs is the peak memory. Models with the same shapes
(the same config and the same tensor names, shapes and dtypes: every depth criterion at one size,
a model and its healed version) do the same work, so one measurement serves them all: latency
depends on the shapes, not on the weights' values. --rounds rounds, each over every shape, the
order reversed each round; latency: the median over all timed runs. With a GPU, the same on it
(peak memory: torch's peak allocation). Models whose checkpoints are byte-identical (two criteria
that remove the same blocks) are pruned, healed and evaluated once.

Everything is kept in --work (default ~/.cache/streamprune/width-bench): a run that stops goes on
where it stopped; --clean removes it at the end. The table goes to benchmarks/RESULTS.md (section
depth-vs-width), the plot to benchmarks/depth_vs_width.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # the real test models' builders

HERE = Path(__file__).resolve().parent
PLOT = HERE / "depth_vs_width.png"
DEPTH_CRITERIA = ("ppl", "taylor", "bi")
WIDTH_CRITERIA = ("flap", "wanda-sp")
KEEP_FIRST, KEEP_LAST = 4, 2  # streamprune depth's defaults: those blocks are never removed


@dataclass
class Row:
    label: str
    kind: str  # dense | depth | width
    criterion: str
    target: float | None
    healed: bool
    path: Path
    share: float = 0.0  # of the block parameters, removed
    same_as: str | None = None  # a row whose checkpoint is byte-identical
    metrics: dict = field(default_factory=dict)


# -- the child: one model's generation timings, in a fresh process ------------------------------------


def generate_child(args) -> None:
    """Load one model, time greedy generation at batch 1 then 16; print JSON."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.generate)
    text = Path(args.text).read_text()[:200_000]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    length = args.prompt_tokens
    prompts = torch.stack([ids[1000 + i * length : 1000 + (i + 1) * length] for i in range(16)])
    model = AutoModelForCausalLM.from_pretrained(args.generate, dtype=torch.float32).to(device).eval()
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=tokenizer.eos_token_id)  # fmt: skip

    def peak() -> int:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def timed(batch: torch.Tensor) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        out = model.generate(batch, attention_mask=torch.ones_like(batch), **settings)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        assert out.shape == (batch.shape[0], length + args.new_tokens), out.shape
        return time.perf_counter() - started

    found = {"threads": torch.get_num_threads()}
    with torch.no_grad():
        for batch_size in (1, 16):
            batch = prompts[:batch_size].to(device)
            timed(batch)  # warm-up
            found[f"b{batch_size}"] = {"seconds": [timed(batch) for _ in range(args.repeats)], "peak_bytes": peak()}
    print("RESULT " + json.dumps(found), flush=True)


def measure_generation(model: Path, args, device: str) -> dict:
    from common import data_dir

    argv = [
        sys.executable, __file__, "--generate", str(model), "--device", device, "--threads", str(args.threads),
        "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
        "--repeats", str(args.repeats), "--text", str(data_dir() / "wikitext2" / "wiki.test.raw"),
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"generation failed: {' '.join(argv)}\n{result.stderr[-3000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


# -- the parent -----------------------------------------------------------------------------------------


def parameters(model: Path) -> tuple[int, int]:
    """(all parameters, those of the decoder blocks) of a checkpoint, from its headers."""
    from streamprune.checkpoint import Checkpoint

    tensors = Checkpoint(model).tensors
    every = sum(math.prod(info.shape) for info in tensors.values())
    blocks = sum(math.prod(info.shape) for name, info in tensors.items() if ".layers." in name)
    return every, blocks


def shape_key(model: Path) -> str:
    """What the generation work depends on: config.json (less names and versions) and every tensor's
    name, shape and dtype."""
    from streamprune.checkpoint import Checkpoint

    config = json.loads((model / "config.json").read_text())
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    tensors = sorted((name, info.shape, info.dtype) for name, info in Checkpoint(model).tensors.items())
    return hashlib.sha256(json.dumps([config, tensors], sort_keys=True, default=list).encode()).hexdigest()


def digest(model: Path) -> str:
    """sha256 of the checkpoint's tensors files, in name order."""
    h = hashlib.sha256()
    for path in sorted(model.glob("*.safetensors")):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def depth_count(target: float, blocks: int) -> int:
    """The number of removable blocks whose share of all blocks is closest to `target`; ties: fewer."""
    candidates = range(1, blocks - KEEP_FIRST - KEEP_LAST + 1)
    return min(candidates, key=lambda k: (abs(Fraction(k, blocks) - Fraction(target).limit_denominator(1000)), k))


def evaluate_once(model: Path, work: Path, limit: int) -> dict:
    """WikiText-2 perplexity over the first `limit` 512-token windows and the seven built-in tasks'
    first `limit` examples each, in one `streamprune eval` (its --output JSON)."""
    from common import TASKS, data_dir, streamprune

    out = work / "eval.json"
    streamprune(
        "eval", str(model), "--ppl", str(data_dir() / "wikitext2" / "wiki.test.raw"), "--tasks", ",".join(TASKS),
        "--data-dir", str(data_dir() / "zeroshot"), "--seqlen", "512", "--limit", str(limit),
        "--output", str(out), "--quiet",
    )  # fmt: skip
    return json.loads(out.read_text())


def done(out: Path) -> bool:
    return (out / "streamprune.json").is_file() and (out / "config.json").is_file()


def run_tool(*args: str) -> float:
    """The real CLI, timed; a failure ends the benchmark with its stderr."""
    from common import streamprune

    started = time.perf_counter()
    streamprune(*args)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", default="0.2,0.35", help="shares of the block parameters to remove")
    parser.add_argument("--limit", type=int, default=5,
                        help="WikiText-2 windows of 512 tokens, and zero-shot examples per task (one eval)")
    parser.add_argument("--width-nsamples", type=int, default=8, help="width's calibration windows of 512 tokens")
    parser.add_argument("--heal-steps", type=int, default=16)
    parser.add_argument("--heal-seqlen", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed generate calls per batch size and round")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per model shape, order reversed each round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the generation processes")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "streamprune" / "width-bench")
    parser.add_argument("--clean", action="store_true", help="remove --work at the end")
    parser.add_argument("--section", default="depth-vs-width")
    parser.add_argument("--plot", default=PLOT.name, help="the plot's file name, in benchmarks/")
    # the child
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--text", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        return generate_child(args)
    run(args)


def run(args) -> None:
    import torch

    from common import C4, conditions, write_section
    from smollm2 import build

    began = time.perf_counter()
    loads = [os.getloadavg()[0]]  # the machine is shared: how busy it was, at the start, before generation, at the end
    print(conditions(), flush=True)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k in (
        "targets", "limit", "width_nsamples", "heal_steps", "heal_seqlen")}  # fmt: skip
    state_file = work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state.get("settings", settings) != settings:
        sys.exit(f"{work} holds models made with {state['settings']}; give another --work or remove it")
    state["settings"] = settings
    state.setdefault("evals", {})
    state.setdefault("seconds", {})

    def save() -> None:
        state_file.write_text(json.dumps(state, indent=1) + "\n")

    model = build()
    dense_params, dense_blocks = parameters(model)
    blocks = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    rows = [Row("dense", "dense", "-", None, False, model)]
    c4 = str(C4)
    scored: dict[str, Path] = {}  # criterion: the first depth output, whose block scores the others reuse

    # 1. prune: depth's k for each target, width to the share depth removed
    for target in [float(t) for t in args.targets.split(",")]:
        k = depth_count(target, blocks)
        share = k / blocks
        for criterion in DEPTH_CRITERIA:
            out = work / f"depth-{criterion}-{k}"
            if not done(out):
                print(f"depth {criterion}, {k} of {blocks} blocks ...", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                flags = ["--force"]
                if criterion in scored:  # one-shot block scores do not depend on k: depth reuses them
                    out.mkdir()
                    shutil.copy(scored[criterion] / "depth_scores.json", out / "depth_scores.json")
                    flags = []
                state["seconds"][out.name] = run_tool(
                    "depth", str(model), "--out", str(out), "--criterion", criterion, "--remove", str(k),
                    "--calib", c4, "--quiet", *flags,
                )  # fmt: skip
                save()
            scored.setdefault(criterion, out)
            rows.append(Row(f"depth {criterion}, {k}/{blocks} blocks", "depth", criterion, target, False, out))
        for criterion in WIDTH_CRITERIA:
            out = work / f"width-{criterion}-{k}"
            if not done(out):
                print(f"width {criterion}, ratio {share:.4f} ...", flush=True)
                state["seconds"][out.name] = run_tool(
                    "width", str(model), "--out", str(out), "--criterion", criterion, "--ratio", f"{share:.6f}",
                    "--calib", c4, "--nsamples", str(args.width_nsamples), "--seqlen", "512", "--seed", "0",
                    "--quiet", "--force",
                )  # fmt: skip
                save()
            rows.append(Row(f"width {criterion}, ratio {share:.3f}", "width", criterion, target, False, out))

    def identical(row: Row, done_rows: list[Row]) -> None:
        """Mark `row` as the same checkpoint as an earlier row, if it is."""
        row.metrics["digest"] = state.setdefault("digests", {}).get(str(row.path)) or digest(row.path)
        state["digests"][str(row.path)] = row.metrics["digest"]
        row.same_as = next((r.label for r in done_rows if r.metrics.get("digest") == row.metrics["digest"]), None)

    seen: list[Row] = []
    for row in rows:
        identical(row, seen)
        seen.append(row)
        _, row_blocks = parameters(row.path)
        row.share = 1 - row_blocks / dense_blocks
    for row in rows[1:]:
        if row.kind == "width":
            record = json.loads((row.path / "streamprune.json").read_text())
            print(f"{row.label}: removed {row.share:.4f} of the block parameters (width's record: "
                  f"{record['achieved_ratio']:.4f}, asked {record['target_ratio']})")  # fmt: skip
        else:
            print(f"{row.label}: removed {row.share:.4f} of the block parameters", flush=True)
        if row.same_as:
            print(f"  the same checkpoint as {row.same_as}")

    # 2. heal every distinct pruned model, the same budget for each
    healed_rows = []
    for row in rows[1:]:
        out = work / f"{row.path.name}-healed"
        source = next((r for r in rows if r.label == row.same_as), None) if row.same_as else None
        if source is not None:
            out = work / f"{source.path.name}-healed"
        if not done(out):
            print(f"healing {row.label} ...", flush=True)
            state["seconds"][out.name] = run_tool(
                "heal", str(row.path), "--out", str(out), "--data", c4, "--steps", str(args.heal_steps),
                "--batch-size", "1", "--seqlen", str(args.heal_seqlen), "--lr", "1e-3", "--base", "fp32",
                "--no-gradient-checkpointing", "--seed", "0", "--quiet", "--force",
            )  # fmt: skip
            save()
        healed_rows.append(Row(row.label + " + LoRA", row.kind, row.criterion, row.target, True, out, row.share,
                               None if source is None else source.label + " + LoRA"))  # fmt: skip
    rows += healed_rows
    for row in healed_rows:
        row.metrics["digest"] = digest(row.path) if row.same_as is None else None

    # 3. perplexity and zero-shot, once per distinct checkpoint
    for row in rows:
        if row.same_as:
            continue
        key = str(row.path)
        if key not in state["evals"]:
            print(f"evaluating {row.label} ...", flush=True)
            started = time.perf_counter()
            found = evaluate_once(row.path, work, args.limit)
            state["evals"][key] = {"ppl": found["perplexity"]["ppl"], "acc": found["average_acc"],
                                   "seconds": time.perf_counter() - started}
            save()
        print(f"  {row.label}: ppl {state['evals'][key]['ppl']:.2f}, acc {state['evals'][key]['acc']:.4f}", flush=True)
    by_label = {row.label: row for row in rows}
    for row in rows:
        row.metrics.update(state["evals"][str((by_label[row.same_as] if row.same_as else row).path)])
        row.metrics["params"] = parameters(row.path)[0]

    # 4. generation, one fresh process per shape and round, the order reversed each round
    shapes: dict[str, Row] = {}
    for row in rows:
        row.metrics["shape"] = shape_key(row.path)
        shapes.setdefault(row.metrics["shape"], row)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    loads.append(os.getloadavg()[0])
    timings: dict[tuple[str, str], list[dict]] = {}
    order = list(shapes)
    for device in devices:
        for round_ in range(args.rounds):
            for key in order if round_ % 2 == 0 else order[::-1]:
                print(f"generation on {device}, round {round_ + 1}: {shapes[key].label} ...", flush=True)
                timings.setdefault((device, key), []).append(measure_generation(shapes[key].path, args, device))
    threads = {t["threads"] for found in timings.values() for t in found}
    for row in rows:
        for device in devices:
            found = timings[(device, row.metrics["shape"])]
            for b in (1, 16):
                seconds = statistics.median(s for f in found for s in f[f"b{b}"]["seconds"])
                row.metrics[f"{device} b{b}"] = {
                    "seconds": seconds,
                    "ms_per_token": 1000 * seconds / args.new_tokens,
                    "tokens_per_s": b * args.new_tokens / seconds,
                    "peak_bytes": max(f[f"b{b}"]["peak_bytes"] for f in found),
                }
    state["rows"] = [{"label": r.label, "same_as": r.same_as, "share": r.share, **r.metrics} for r in rows]
    save()
    wall = time.perf_counter() - began
    loads.append(os.getloadavg()[0])
    machine = conditions() + "\n- load average (1 min) at the start, before the generation timings, at the end: " + ", ".join(
        f"{x:.1f}" for x in loads) + " (a shared machine: other work ran beside this one)"  # fmt: skip

    body = table(rows, args, devices, threads, machine, wall, shapes, HERE / args.plot)
    plot(rows, devices[-1], HERE / args.plot)
    write_section(args.section, body)
    if args.clean:
        shutil.rmtree(work)


def table(rows: list[Row], args, devices, threads, conditions: str, wall: float, shapes: dict, plot_file: Path) -> str:
    dense = rows[0].metrics
    defaults = {"targets": "0.2,0.35", "limit": 5, "width_nsamples": 8, "heal_steps": 16, "heal_seqlen": 256,
                "new_tokens": 32, "prompt_tokens": 32, "repeats": 2, "rounds": 2, "threads": 2}  # fmt: skip
    options = "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k, v in defaults.items() if getattr(args, k) != v)
    lines = [
        "## Depth against width: SmolLM2-135M pruned to the same sizes, one-shot and healed",
        "",
        f"Command: `python benchmarks/width.py{options}` ({wall / 60:.0f} min here, models kept in --work). "
        f"Depth: `streamprune depth --remove k` (k of 30 blocks, the count closest to each --targets share, "
        "10 x 128 C4 tokens, seed 1234, blocks 0-3 and 28-29 kept); width: `streamprune width --ratio r` with r "
        f"the share depth removed ({args.width_nsamples} x 512 C4 tokens, seed 0). Removed: the share of the "
        "decoder blocks' parameters gone, from the checkpoints. Healed (+ LoRA): `streamprune heal`, rank 16, "
        f"{args.heal_steps} steps x 1 x {args.heal_seqlen} C4 tokens, lr 1e-3, fp32 base, the same for every "
        f"model. Perplexity: WikiText-2 test, the first {args.limit} windows of 512 tokens; zero-shot: mean acc "
        f"of the seven built-in tasks, the first {args.limit} examples each (one `streamprune eval --limit "
        f"{args.limit}`; so few that one standard error is about {50 / (7 * args.limit) ** 0.5:.0f} points on "
        "the mean: these limits keep the whole benchmark near 40 minutes on this machine). "
        f"Generation: transformers `generate`, greedy, float32, a {args.prompt_tokens}-token prompt and exactly "
        f"{args.new_tokens} new tokens, batch 1 and batch 16 (16 different prompts of equal length), torch "
        f"threads {', '.join(map(str, sorted(threads)))}; a fresh process per model shape and round, a warm-up "
        f"then {args.repeats} timed calls per batch size, {args.rounds} rounds in alternating order; latency: "
        "the median call time per new token; throughput: new tokens/s (all sequences); peak: the process's "
        "peak RSS after its batch-1 calls and after its batch-16 calls. Models with the same shapes (every "
        "depth criterion at one size, a model and its healed version) share one measurement "
        f"({len(shapes)} shapes measured): the work depends on the shapes, not on the values. Speed-up: the "
        "dense model's batch-1 latency / this one's. A row marked = is byte-identical to the row it names.",
        "",
        conditions,
        "",
    ]
    for device in devices:
        if len(devices) > 1:
            lines += [f"Generation on {device}.", ""]
        lines += [
            "| model | removed | parameters | WikiText-2 ppl | zero-shot avg | b1 ms/token | b1 tokens/s | "
            "b1 peak | b1 speed-up | b16 ms/step | b16 tokens/s | b16 peak |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        base = dense[f"{device} b1"]["seconds"]
        for row in rows:
            m = row.metrics
            b1, b16 = m[f"{device} b1"], m[f"{device} b16"]
            label = row.label + (f" (= {row.same_as})" if row.same_as else "")
            lines.append(
                f"| {label} | {row.share:.1%} | {m['params'] / 1e6:.1f} M ({m['params'] / dense['params']:.0%}) | "
                f"{m['ppl']:.2f} | {100 * m['acc']:.1f} | {b1['ms_per_token']:.1f} | {b1['tokens_per_s']:.1f} | "
                f"{b1['peak_bytes'] / 2**20:.0f} MiB | {base / b1['seconds']:.2f}x | {b16['ms_per_token']:.1f} | "
                f"{b16['tokens_per_s']:.0f} | {b16['peak_bytes'] / 2**20:.0f} MiB |"
            )
        lines.append("")
    lines += [f"![perplexity and accuracy against batch-1 latency]({plot_file.name})", "", conclusions(rows, devices[0])]
    return "\n".join(lines)


def conclusions(rows: list[Row], device: str) -> str:
    """3-5 sentences from the measured numbers: which family is faster, which keeps quality, at each size."""
    dense = rows[0].metrics
    b1 = lambda r: r.metrics[f"{device} b1"]["seconds"]  # noqa: E731
    b16 = lambda r: r.metrics[f"{device} b16"]["seconds"]  # noqa: E731
    sentences = []
    for target in sorted({r.target for r in rows[1:]}):
        group = [r for r in rows[1:] if r.target == target]
        depth = [r for r in group if r.kind == "depth"]
        width = [r for r in group if r.kind == "width"]
        share_d, share_w = depth[0].share, statistics.mean(r.share for r in width)
        speed = lambda rs, f: statistics.median(f(rows[0]) / f(r) for r in rs)  # noqa: E731
        sd1, sw1, sd16, sw16 = speed(depth, b1), speed(width, b1), speed(depth, b16), speed(width, b16)
        best_d1 = min((r for r in depth if not r.healed), key=lambda r: r.metrics["ppl"])
        best_w1 = min((r for r in width if not r.healed), key=lambda r: r.metrics["ppl"])
        best_dh = min((r for r in depth if r.healed), key=lambda r: r.metrics["ppl"])
        best_wh = min((r for r in width if r.healed), key=lambda r: r.metrics["ppl"])
        faster1 = "depth" if sd1 > sw1 else "width"
        sentences.append(
            f"At {share_d:.0%} of the block parameters removed (width {share_w:.1%}), depth runs batch-1 generation "
            f"{sd1:.2f}x as fast as the dense model and width {sw1:.2f}x (batch 16: {sd16:.2f}x and {sw16:.2f}x), so "
            f"{faster1} is the faster one at batch 1 on this {device.upper()}."
        )
        (win1, lose1), (winh, loseh) = (sorted(pair, key=lambda r: r.metrics["ppl"])
                                        for pair in ((best_d1, best_w1), (best_dh, best_wh)))  # fmt: skip
        sentences.append(
            f"In quality at that size the best one-shot model is {win1.kind}'s ({win1.label}: perplexity "
            f"{win1.metrics['ppl']:.1f}, zero-shot {100 * win1.metrics['acc']:.1f}) against {lose1.kind}'s "
            f"({lose1.label}: {lose1.metrics['ppl']:.1f}, {100 * lose1.metrics['acc']:.1f}; dense "
            f"{dense['ppl']:.1f}, {100 * dense['acc']:.1f}), and after the same LoRA healing {winh.kind}'s "
            f"({winh.metrics['ppl']:.1f} against {loseh.metrics['ppl']:.1f})."
        )
    depth_all = [r for r in rows[1:] if r.kind == "depth"]
    width_all = [r for r in rows[1:] if r.kind == "width"]
    quality = "width" if statistics.median(r.metrics["ppl"] for r in width_all) < statistics.median(
        r.metrics["ppl"] for r in depth_all) else "depth"  # fmt: skip
    fast = "depth" if statistics.median(b1(rows[0]) / b1(r) for r in depth_all) > statistics.median(
        b1(rows[0]) / b1(r) for r in width_all) else "width"  # fmt: skip
    if quality == fast:
        sentences.append(f"On these numbers {quality} pruning wins on both counts here: choose it at either size.")
    else:
        sentences.append(
            f"So on these numbers: choose {fast} pruning where batch-1 latency on a CPU is what matters, and {quality} "
            "pruning where perplexity and accuracy at a given parameter count matter more."
        )
    return " ".join(sentences)


def plot(rows: list[Row], device: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"dense": "black", "ppl": "tab:blue", "taylor": "tab:cyan", "bi": "tab:purple",
              "flap": "tab:red", "wanda-sp": "tab:orange"}  # fmt: skip
    markers = {t: mk for t, mk in zip(sorted({r.target for r in rows if r.target is not None}), "osD^v")}
    for ax, metric, name in ((axes[0], "ppl", "WikiText-2 perplexity (log)"), (axes[1], "acc", "zero-shot mean acc (%)")):
        for row in rows:
            m = row.metrics
            x = m[f"{device} b1"]["ms_per_token"]
            y = m[metric] if metric == "ppl" else 100 * m[metric]
            color = colors["dense" if row.kind == "dense" else row.criterion]
            marker = "*" if row.kind == "dense" else markers.get(row.target, "D")
            ax.scatter(x, y, s=140 if row.kind == "dense" else 60, marker=marker,
                       facecolors=color if not row.healed else "none", edgecolors=color, linewidths=1.5)  # fmt: skip
        ax.set_xlabel(f"batch-1 latency, ms per new token ({device})")
        ax.set_ylabel(name)
        if metric == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=k) for k, c in colors.items()]
    handles += [plt.Line2D([], [], color="gray", marker=mk, linestyle="", label=f"target ~{t:.0%}") for t, mk in markers.items()]
    handles += [plt.Line2D([], [], color="gray", marker="o", markerfacecolor="none", linestyle="", label="+ LoRA (hollow)")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("SmolLM2-135M: depth (ppl, taylor, bi) against width (flap, wanda-sp) pruning, one-shot and healed")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
