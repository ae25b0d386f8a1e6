"""The scores report (depth_scores.json and .csv, the summary printed), and an earlier run's read
back so that its scores are reused."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

from ..errors import UsageError
from ..outdir import RECORD_FILE
from ..sizes import format_size
from ..stream import Source
from ..version import __version__
from .config import DepthConfig, candidates

SCORES_JSON, SCORES_CSV, SCORES_PNG = "depth_scores.json", "depth_scores.csv", "depth_scores.png"


def depth_report(config: DepthConfig, source: Source, structure, rounds, calibration, scoring_seconds) -> dict:
    num_layers = source.num_layers
    allowed = candidates(num_layers, config.keep_first, config.keep_last)
    removed = sorted(i for r in rounds for i in r["removed"])
    return {
        "streamprune": __version__,
        "model": config.model,
        "directory": str(source.directory),
        "criterion": config.criterion,
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "num_hidden_layers": num_layers,
        "protected": [i for i in range(num_layers) if i not in allowed],
        "removed": removed,
        "kept": [i for i in range(num_layers) if i not in removed],
        "blocks": [
            {"block": i, "score": rounds[0]["scores"][i], "protected": i not in allowed, "removed": i in removed}
            for i in range(num_layers)
        ],
        "rounds": rounds,
        "calibration": calibration,
        "structure": structure,
        "bytes_read": rounds[-1]["bytes_read"],
        "checkpoint_bytes": source.checkpoint.total_bytes,
        "passes": sum(r["passes"] for r in rounds),
        "scoring_seconds": scoring_seconds,
        "device": str(source.runner.device),
        "compute_dtype": str(source.dtype).removeprefix("torch."),
    }


def earlier_scores(out: Path, structure: dict) -> dict | None:
    """The report of an unfinished or scores-only run in `out` with the same `structure`, its score
    keys made integers again; None when there is none. Other settings are refused, as for run."""
    path = out / SCORES_JSON
    if not path.is_file() or (out / RECORD_FILE).is_file():
        return None
    try:
        report = json.loads(path.read_text())
        earlier = report["structure"]
        for r in report["rounds"]:
            r["scores"] = {int(block): score for block, score in r["scores"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # not ours, or unreadable: check_output_dir decides what to do with --out
    if earlier != structure:
        changed = [k for k in structure if earlier.get(k) != structure[k]]
        raise UsageError(
            f"--out {out} holds block scores from a run with other settings ({', '.join(changed)} differ). "
            "Choose another --out, or add --force to discard them and score again."
        )
    return report


def scores_csv(report: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["block", f"{report['criterion']}_score", "protected", "removed"])
    for row in report["blocks"]:
        writer.writerow([row["block"], repr(row["score"]), int(row["protected"]), int(row["removed"])])
    return buffer.getvalue()


def summary(report: dict) -> str:
    lines = [
        f"scored {report['num_hidden_layers']} blocks of {report['model']} by {report['criterion']} in "
        f"{report['scoring_seconds']:.1f} s on {report['device']}; read {format_size(report['bytes_read'])} "
        f"({report['bytes_read'] / report['checkpoint_bytes']:.2f}x the checkpoint) in {report['passes']} pass(es)",
    ]
    if report["removed"]:
        lines.append(
            f"removed blocks {', '.join(map(str, report['removed']))}: {report['num_hidden_layers']} -> "
            f"{len(report['kept'])} blocks; wrote {report['arguments']['out']}"
        )
    for seam, losses in report.get("reconstruct", {}).items():
        lines.append(
            f"healed block {seam}: mean squared error to the removed span's output "
            f"{losses['loss_first_epoch']:.4g} (first epoch) -> {losses['loss_last_epoch']:.4g} (last)"
        )
    lines.append(f"scores: {SCORES_JSON}, {SCORES_CSV}, chart: {SCORES_PNG}")
    return "\n".join(lines)
