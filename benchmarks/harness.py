"""lm-evaluation-harness, streamed: the same seven zero-shot tasks through `--model streamprune` (our
backend, each layer read once) and through the harness's own `--model hf` (the whole model loaded),
on SmolLM2-135M on the CPU; wall time and peak RSS side by side, and their ratios streamed / whole.

    export STREAMPRUNE_DATA=/path/to/data       # the data folder: wikitext2/, c4/, zeroshot/
    python benchmarks/harness.py [--limit 25] [--repeats 2] [--hf-batch-size 16]

Tasks: the Wanda paper's zero-shot set as available offline (arc_easy, arc_challenge, piqa, boolq,
winogrande, hellaswag, openbookqa), through the local task YAMLs of tests/harness_tasks/ (task names
`<task>_local`), written into a temporary include path with their data paths filled in from the data
folder (STREAMPRUNE_DATA), as tests/test_harness.py does; the first --limit documents of each task.

Each variant runs in its own fresh process under `/usr/bin/time -v` (peak RSS: its maximum resident
set size; wall time: the whole process, from start to exit, model and datasets loading included):
- streamed: `streamprune eval MODEL --tasks ... --include-path DIR --limit N` (CPU, float32, the
  default --batch-tokens 8192);
- whole model: `python -m lm_eval --model hf --model_args pretrained=MODEL,dtype=float32 --device cpu
  --batch_size B --include_path DIR --limit N`.
The datasets are built once before anything is timed (the harness caches them), so neither variant
pays for it alone. The variants alternate: repeat 1 runs streamed first, repeat 2 whole-model first,
...; ratios are of the medians. Both backends' accuracies are printed beside the timings: they score
the same requests and must agree. The table goes to benchmarks/RESULTS.md (section harness); the
plan of a Llama-2-70B evaluation on an RTX 4090 to its own section (harness-plan; `--plan-only`
writes just that one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # the real test models' builders
from common import ROOT, TASKS, conditions, data_dir, write_section  # noqa: E402
from smollm2 import build  # noqa: E402

TEMPLATES = ROOT / "tests" / "harness_tasks"
LOCAL = [f"{task}_local" for task in TASKS]
PLAN_TASKS = "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # the local task files only; never the hub


def prepare_tasks(root: Path) -> Path:
    """The local task YAMLs with their data paths filled in, PIQA's labels merged into its file (a task
    YAML reads one file per split): tests/test_harness.py's task_dir, here."""
    data = data_dir()
    prepared, tasks = root / "prepared", root / "tasks"
    prepared.mkdir()
    tasks.mkdir()
    goals = (data / "zeroshot" / "piqa" / "valid.jsonl").read_text().splitlines()
    labels = (data / "zeroshot" / "piqa" / "valid-labels.lst").read_text().split()
    merged = [json.dumps({**json.loads(g), "label": int(label)}) for g, label in zip(goals, labels)]
    (prepared / "piqa_valid.jsonl").write_text("\n".join(merged) + "\n")
    for template in TEMPLATES.glob("*.yaml"):
        text = template.read_text().replace("{data}", str(data)).replace("{prepared}", str(prepared))
        (tasks / template.name).write_text(text)
    shutil.copy(TEMPLATES / "utils.py", tasks / "utils.py")
    return tasks


def build_datasets(tasks: Path) -> None:
    """Build (and so cache) every task's dataset once, untimed, in a process of its own."""
    code = (
        "from lm_eval.tasks import TaskManager, get_task_dict; import sys; "
        "get_task_dict(sys.argv[1].split(','), TaskManager(include_path=sys.argv[2]))"
    )
    subprocess.run([sys.executable, "-c", code, ",".join(LOCAL), str(tasks)], check=True,
                   env={**os.environ, **OFFLINE}, capture_output=True)  # fmt: skip


def command(variant: str, model: Path, tasks: Path, limit: int, out: Path, hf_batch: int) -> list[str]:
    if variant == "streamed":
        return [
            sys.executable, "-m", "streamprune", "eval", str(model), "--tasks", ",".join(LOCAL),
            "--include-path", str(tasks), "--limit", str(limit), "--device", "cpu", "--dtype", "float32",
            "--output", str(out / "results.json"), "--quiet",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={model},dtype=float32", "--device", "cpu",
        "--batch_size", str(hf_batch), "--tasks", ",".join(LOCAL), "--include_path", str(tasks),
        "--limit", str(limit), "--output_path", str(out),
    ]  # fmt: skip


def measure(argv: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes, stdout) of `argv` in a fresh process under /usr/bin/time -v."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True,
                            env={**os.environ, **OFFLINE})  # fmt: skip
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(argv)}\n{result.stderr[-4000:]}")
    kbytes = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    return seconds, int(kbytes[1]) * 1024, result.stdout


def accuracies(variant: str, out: Path) -> dict[str, float]:
    """{task: acc} from the variant's results file."""
    if variant == "streamed":
        results = json.loads((out / "results.json").read_text())["results"]
    else:
        found = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
        results = json.loads(found[-1].read_text())["results"]
    return {task: results[task]["acc,none"] for task in LOCAL}


PLAN_RAM = ("128GB", "32GB")  # a workstation that holds the buffer, and one that must put it in a file


def plan_estimates() -> list[tuple[str, dict]]:
    """The plan of a Llama-2-70B evaluation of the Wanda set on an RTX 4090 (24 GB), for each RAM size
    of PLAN_RAM: (the command, its JSON)."""
    plans = []
    for ram in PLAN_RAM:
        argv = ["streamprune", "plan", "llama-70b", "--device", "rtx4090", "--max-ram", ram, "--tasks", PLAN_TASKS,
                "--json"]  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "streamprune", *argv[1:]], capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"failed: {' '.join(argv)}\n{result.stderr[-3000:]}")
        plans.append((" ".join(argv), json.loads(result.stdout)))
    return plans


def plan_section() -> None:
    """Its own section: the plan changes with the code, not with a measurement."""
    lines = [
        "## Planned: a Llama-2-70B evaluation of the Wanda paper's seven tasks on a 24 GB GPU",
        "",
        f"Command: `python benchmarks/harness.py --plan-only` (runs `streamprune plan llama-70b --device rtx4090 "
        f"--max-ram RAM --tasks {PLAN_TASKS}`). Nothing is measured: these are the plan's estimates, from the "
        "config alone; the plan states its assumptions (tokens per request, the GPU's speed).",
        "",
        code_line(),
        "",
        "| RAM | requests | tokens through every layer | activation buffer | peak RAM | peak VRAM | time |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for (_, plan), ram in zip(plan_estimates(), PLAN_RAM):
        where = "in a file (--offload-dir)" if plan["offload"] != "cpu" else "in RAM"
        lines.append(
            f"| {ram} | {plan['sequences']:,} | {plan['tokens'] / 1e6:.2f} M | {plan['buffer_bytes'] / 2**30:.1f} GiB "
            f"{where} | {plan['peak_ram_bytes'] / 2**30:.1f} GiB | {plan['peak_vram_bytes'] / 2**30:.1f} GiB | "
            f"{plan['seconds']['total'] / 3600:.1f} h |"
        )
    write_section("harness-plan", "\n".join(lines))


def code_line() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    return f"- streamprune at commit {commit.strip()}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=25, help="documents per task")
    parser.add_argument("--plan-only", action="store_true", help="write only the planned 70B evaluation")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating the order")
    parser.add_argument("--hf-batch-size", type=int, default=16, help="lm_eval --batch_size of the hf backend")
    args = parser.parse_args()
    if args.plan_only:
        plan_section()
        return
    model = build()
    work = Path(tempfile.mkdtemp())
    variants = ("streamed", "whole model")
    runs: dict[str, list[tuple[float, int]]] = {v: [] for v in variants}
    accs: dict[str, dict[str, float]] = {}
    began = time.perf_counter()
    try:
        tasks = prepare_tasks(work)
        print("building the task datasets once (untimed) ...", flush=True)
        build_datasets(tasks)
        for repeat in range(args.repeats):
            for variant in variants if repeat % 2 == 0 else variants[::-1]:
                out = work / f"{variant.replace(' ', '_')}-{repeat}"
                out.mkdir()
                seconds, rss, _ = measure(command(variant, model, tasks, args.limit, out, args.hf_batch_size))
                runs[variant].append((seconds, rss))
                accs[variant] = accuracies(variant, out)
                print(f"repeat {repeat + 1}, {variant}: {seconds:.1f} s, peak RSS {rss / 2**20:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(work)
    wall = time.perf_counter() - began

    seconds = {v: statistics.median(s for s, _ in runs[v]) for v in variants}
    rss = {v: max(r for _, r in runs[v]) for v in variants}
    options = [f"--limit {args.limit}"] * (args.limit != 25) + [f"--repeats {args.repeats}"] * (args.repeats != 2)
    options += [f"--hf-batch-size {args.hf_batch_size}"] * (args.hf_batch_size != 16)
    lines = [
        "## lm-evaluation-harness, streamed: `--model streamprune` against `--model hf`",
        "",
        f"Command: `python benchmarks/harness.py{''.join(' ' + o for o in options)}` ({wall / 60:.0f} min here). "
        f"SmolLM2-135M (float32) on the CPU, the seven tasks {', '.join(TASKS)} through the local task YAMLs "
        f"of tests/harness_tasks/ (over the data folder, STREAMPRUNE_DATA), the first {args.limit} documents "
        f"of each ({sum(1 for _ in TASKS) * args.limit} documents in all), zero-shot. streamed: `streamprune "
        "eval MODEL --tasks ... --include-path DIR` (the `streamprune` backend, --batch-tokens 8192); whole "
        f"model: `python -m lm_eval --model hf` (batch size {args.hf_batch_size}). Each run is a fresh process "
        "under `/usr/bin/time -v`: wall time of the whole process (loading included, the datasets already "
        f"cached), peak RSS its maximum resident set size. {args.repeats} runs of each, the order alternating; "
        "time: the median, peak RSS: the largest. Ratio = streamed / whole model (below 1: the streamed "
        "backend uses less).",
        "",
        conditions(),
        "",
        "| backend | wall time (each run) | median | peak RSS | mean acc |",
        "|---|---|---:|---:|---:|",
    ]
    for v in variants:
        each = ", ".join(f"{s:.0f} s" for s, _ in runs[v])
        mean_acc = statistics.mean(accs[v].values())
        lines.append(f"| {v} | {each} | {seconds[v]:.0f} s | {rss[v] / 2**20:.0f} MiB | {100 * mean_acc:.1f} |")
    lines.append(
        f"| **ratio streamed / whole** | | **{seconds['streamed'] / seconds['whole model']:.2f}x** | "
        f"**{rss['streamed'] / rss['whole model']:.2f}x** | |"
    )
    lines += [
        "",
        "acc per task (streamed / whole model): "
        + "; ".join(f"{t} {100 * accs['streamed'][f'{t}_local']:.1f} / {100 * accs['whole model'][f'{t}_local']:.1f}"
                    for t in TASKS)  # fmt: skip
        + ".",
        "",
    ]
    write_section("harness", "\n".join(lines))
    plan_section()


if __name__ == "__main__":
    main()
