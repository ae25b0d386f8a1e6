"""The width run's record (streamprune.json): what ran, what every layer lost, the parameter counts
and the share removed, and whether FLAP's bias compensation could be applied."""

from __future__ import annotations

import platform
import sys

import torch
import transformers

from ..calibration import CALIBRATION_FILE
from ..families import text_config
from ..version import __version__
from .shapes import parameter_count


def block_parameters(plan, source) -> tuple[int, int]:
    """(before, after): the decoder blocks' parameters, every layer alike."""
    before = parameter_count(source.family, text_config(source.checkpoint.config)) * source.num_layers
    after = parameter_count(source.family, text_config(plan.config)) * source.num_layers
    return before, after


def compensation_note(config, plan) -> dict:
    """Where FLAP's bias compensation went, and why not elsewhere."""
    if config.criterion != "flap":
        return {"applied": [], "note": f"{config.criterion} has no bias compensation (FLAP's alone)"}
    applied = [site for site, can in plan.compensate.items() if can]
    skipped = [site for site, can in plan.compensate.items() if not can]
    note = "compensated where the config can carry a bias"
    if skipped:
        note = (f"skipped for {', '.join(skipped)}: this family's config cannot give that output Linear a bias, so "
                "the removed channels' mean contribution is lost there")  # fmt: skip
    return {"applied": applied, "skipped": skipped, "note": note}


def width_record(config, source, plan, state, calibration, writer) -> dict:
    before, after = block_parameters(plan, source)
    g, cut = plan.geometry, plan.cut
    source_record = {"model": config.model, "directory": str(source.directory),
                     "architecture": source.family.architecture, "num_hidden_layers": source.num_layers}  # fmt: skip
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    per_layer = {"kv_groups_removed": cut.groups, "kv_heads": [g.kv_heads, g.kv_heads - cut.groups],
                 "attention_heads": [g.heads, (g.kv_heads - cut.groups) * g.group_heads],
                 "channels_removed": cut.channels, "intermediate_size": [g.intermediate, g.intermediate - cut.channels]}  # fmt: skip
    record = {
        "streamprune": __version__,
        "command": sys.argv,
        "arguments": config.as_record(),
        "source": source_record,
        "versions": versions,
        "device": str(source.runner.device),
        "compute_dtype": str(source.dtype).removeprefix("torch."),
        "criterion": config.criterion,
        "target_ratio": config.ratio,
        "attention_share": plan.attention_share,
        "per_layer": per_layer,
        "block_parameters": {"before": before, "after": after},
        "achieved_ratio": 1 - after / before,
        "propagate": "dense" if config.criterion == "flap" else "pruned",
        "bias_compensation": compensation_note(config, plan),
        "calibration": None,
        "layers": state.layers,
        "output_files": writer.files,
        "sessions": state.sessions,  # more than one: the run was resumed
        "total_seconds": state.seconds,
    }
    if calibration is not None:
        record["calibration"] = {k: v for k, v in calibration.items() if k != "input_ids"}
        record["calibration"]["ids_file"] = CALIBRATION_FILE
    return record


def summary(record: dict) -> str:
    layer = record["per_layer"]
    heads, size = layer["attention_heads"], layer["intermediate_size"]
    lines = [
        (f"narrowed {record['source']['num_hidden_layers']} layers of {record['source']['model']} by "
         f"{record['criterion']}: attention heads {heads[0]} -> {heads[1]}, MLP channels {size[0]} -> {size[1]} "
         "per layer"),
        (f"block parameters {record['block_parameters']['before']:,} -> {record['block_parameters']['after']:,} "
         f"(removed {record['achieved_ratio']:.4f}, asked {record['target_ratio']}); bias compensation: "
         f"{record['bias_compensation']['note']}"),
        f"wrote {record['arguments']['out']} ({len(record['output_files'])} shards); run record: streamprune.json",
    ]  # fmt: skip
    return "\n".join(lines)
