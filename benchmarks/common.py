"""Shared by the benchmarks: where things are, what machine this is, and writing RESULTS.md."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
DATA_VARIABLE = "STREAMPRUNE_DATA"


def data_dir() -> Path:
    """The data folder (STREAMPRUNE_DATA): wikitext2/, c4/, zeroshot/. Unset or not a directory, the
    benchmark ends saying so."""
    value = os.environ.get(DATA_VARIABLE, "").strip()
    if not value:
        sys.exit(
            f"{DATA_VARIABLE} is not set: export {DATA_VARIABLE}=the data folder "
            "(the one holding wikitext2/wiki.test.raw, c4/c4_validation_2k.jsonl.gz and zeroshot/)"
        )
    folder = Path(value).expanduser()
    if not folder.is_dir():
        sys.exit(f"{DATA_VARIABLE}={value} is not a directory: point it at the data folder (wikitext2/, c4/, zeroshot/)")
    return folder.resolve()


def __getattr__(name: str) -> Path:
    """DATA (the data folder) and C4 (its calibration documents), read from STREAMPRUNE_DATA only when
    a benchmark asks for them: `from common import C4` in a script that needs the data, while one
    that needs none (plots.py) runs without the variable."""
    if name == "DATA":
        return data_dir()
    if name == "C4":
        return data_dir() / "c4" / "c4_validation_2k.jsonl.gz"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def conditions() -> str:
    """Hardware and versions, as a markdown list."""
    import torch
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return "\n".join(
        [
            f"- CPU: {cpu}, {os.cpu_count()} cores; RAM {ram_gib:.0f} GiB; GPU: {gpu}",
            f"- Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}",
            f"- streamprune at commit {code_version()}",
        ]
    )


def code_version() -> str:
    """The commit the measured code is at ("+ changes" when the tree differs from it)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # a copy of the tree without .git (a GPU machine's) is told its commit by STREAMPRUNE_COMMIT
    commit = git("rev-parse", "--short", "HEAD") or os.environ.get("STREAMPRUNE_COMMIT", "unknown")
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "--", "streamprune") else "")


def max_rss_bytes(command: list[str]) -> int:
    """Run `command` under /usr/bin/time -v; return its peak resident set size in bytes."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    kbytes = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    return int(kbytes[1]) * 1024


def dir_bytes(directory: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(directory).glob(pattern))


def write_section(name: str, body: str) -> None:
    """Print `body` and make it the section `name` of RESULTS.md (between markers), keeping every
    other section."""
    print(body)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nWritten by the scripts in `benchmarks/`; do not edit by hand.\n"
    )
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


TASKS = ["arc_easy", "arc_challenge", "piqa", "boolq", "winogrande", "hellaswag", "openbookqa"]


def streamprune(*args: str) -> None:
    """Run the real CLI; a failure ends the benchmark with its stderr."""
    command = [sys.executable, "-m", "streamprune", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")


def pick_labels(text: str, known, what: str) -> list[str]:
    """The comma-separated labels of `text`, each one of `known`; otherwise the benchmark ends
    naming the unknown ones and the choices."""
    wanted = [label.strip() for label in text.split(",")]
    unknown = [label for label in wanted if label not in known]
    if unknown:
        sys.exit(f"unknown {what} {unknown}; choose from: {', '.join(known)}")
    return wanted


def perplexity(model: Path, work: Path, ppl_windows: int, *options: str) -> float:
    """WikiText-2 perplexity over the first `ppl_windows` 512-token windows, from `streamprune eval`
    (with `options`, e.g. --device cuda)."""
    ppl_json = work / "ppl.json"
    streamprune(
        "eval", str(model), "--ppl", str(data_dir() / "wikitext2" / "wiki.test.raw"), "--seqlen", "512",
        "--limit", str(ppl_windows), "--output", str(ppl_json), "--quiet", *options,
    )  # fmt: skip
    return json.loads(ppl_json.read_text())["perplexity"]["ppl"]


def evaluate(model: Path, work: Path, ppl_windows: int, limit: int) -> tuple[float, dict]:
    """(WikiText-2 perplexity over the first `ppl_windows` 512-token windows, the zero-shot results
    over the first `limit` examples of each task), from `streamprune eval`. Two evaluations:
    --limit means different things to perplexity and to the tasks."""
    tasks_json = work / "tasks.json"
    ppl = perplexity(model, work, ppl_windows)
    streamprune(
        "eval", str(model), "--tasks", ",".join(TASKS), "--data-dir", str(data_dir() / "zeroshot"),
        "--seqlen", "512", "--limit", str(limit), "--output", str(tasks_json), "--quiet",
    )  # fmt: skip
    return ppl, json.loads(tasks_json.read_text())
