"""Depth pruning (Shortened LLaMA, Kim et al. 2024): score every decoder block, remove the weakest
whole blocks, and write a shorter checkpoint.

Every criterion is computed streamed, one block on the device at a time:
- magnitude: sum of |W| over the block's seven Linear weights (no calibration data);
- bi (block influence, ShortGPT): 1 - cos(block input, block output), averaged over tokens;
- ppl: perplexity of the calibration data with that one block skipped. One pass over the weights
  carries a "skip stream" per block (the hidden states of the model without it), so the weights are
  read once, not once per block; when the streams do not fit in RAM, a few passes each carry some;
- taylor: sum of |W * dL/dW| over the Linear weights, L the mean next-token loss. A forward pass
  keeps every block's input; a reverse pass reloads the blocks last to first, carrying dL/dh back.
Low scores mean unimportant blocks in all four; the lowest are removed, never the first
`keep_first` nor the last `keep_last` (the paper's "+": removing block 0 or 1 destroys the model).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig

from . import buffers
from .buffers import available_ram_bytes
from .calibration import calibration_path, file_sha256, sample_calibration
from .config import check_choice, check_dtype, check_positive, parse_device, parse_shard_size
from .errors import UsageError
from .outdir import (
    RECORD_FILE,
    OutputLock,
    check_destination,
    check_not_source,
    check_output_dir,
    copy_support_files,
    prepare_output_dir,
    write_json,
)
from .reconstruct import OPTIMIZERS, ReconstructSettings, reconstruct_layer, trainable
from .runstate import (
    DEPTH_STATE_FILE,
    ScoringState,
    check_free_space,
    check_same_structure,
    saved_state,
    source_fingerprint,
)
from .sizes import format_size
from .stream import (
    LayerReader,
    Source,
    check_activations_finite,
    check_weights_finite,
    forward_batches,
    load_head,
    open_source,
    token_logprobs,
)
from .version import __version__
from .writer import CheckpointWriter, write_atomic

CRITERIA = ("ppl", "taylor", "magnitude", "bi")
# the scores depend on the dtype: float32 scores anew
IN_FLOAT32 = "score in float32 with --dtype float32 --force (or --dtype float32 and a new --out)"
SCORES_JSON, SCORES_CSV, SCORES_PNG = "depth_scores.json", "depth_scores.csv", "depth_scores.png"


@dataclass
class DepthConfig:
    model: str
    out: Path
    criterion: str = "ppl"
    remove: int | None = None  # number of blocks to remove; or
    ratio: float | None = None  # the fraction of all blocks to remove (rounded)
    keep_first: int = 4
    keep_last: int = 2
    iterative: bool = False  # remove one block at a time and rescore the shorter model
    scores_only: bool = False
    calib: str = "c4"
    nsamples: int = 10  # the paper's calibration: 10 x 128 tokens, seed 1234
    seqlen: int = 128
    seed: int = 1234
    batch_size: int = 1
    max_streams: int | None = None  # ppl: skip streams carried per pass; None: what fits in half the free RAM
    device: str = "auto"
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    checkpoint_minutes: float = 5.0  # save the scoring's progress this often (0: after every block)
    overlap: bool = True  # read the next block while this one computes
    # --reconstruct: the block before each removed span is trained to produce what the span produced
    reconstruct: bool = False
    reconstruct_epochs: int = 4
    reconstruct_lr: float = 1e-3
    reconstruct_batch_size: int = 1
    reconstruct_optimizer: str = "adam"  # or adam8bit
    reconstruct_nsamples: int = 32  # its own calibration windows: the scoring's 10 x 128 are too few to train on
    reconstruct_seqlen: int = 512
    force: bool = False
    quiet: bool = False

    def __post_init__(self):
        self.out = Path(self.out)
        check_choice("--criterion", self.criterion, CRITERIA)
        if not self.scores_only and (self.remove is None) == (self.ratio is None):
            raise UsageError("give --remove K (blocks) or --ratio R (fraction of blocks), or --scores-only")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise UsageError(f"--ratio {self.ratio} is outside (0, 1): it is the fraction of blocks removed, e.g. 0.2")
        check_positive(self, "remove", "nsamples", "seqlen", "batch_size", "max_streams")
        check_positive(self, "reconstruct_epochs", "reconstruct_lr", "reconstruct_batch_size", "reconstruct_nsamples",
                       "reconstruct_seqlen")  # fmt: skip
        check_choice("--reconstruct-optimizer", self.reconstruct_optimizer, OPTIMIZERS)
        if self.reconstruct and self.scores_only:
            raise UsageError("--reconstruct heals the shortened checkpoint; --scores-only writes none. Drop one")
        for name in ("keep_first", "keep_last", "checkpoint_minutes"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        check_dtype(self.dtype)
        self.max_shard_bytes = parse_shard_size(self.max_shard_size)
        self.torch_device = parse_device(self.device)


# -- pure functions: numbers in, numbers out ---------------------------------------------------------


def removal_count(num_layers: int, remove: int | None, ratio: float | None, keep_first: int, keep_last: int) -> int:
    """How many blocks to remove, checked against the removable ones."""
    removable = num_layers - keep_first - keep_last
    if removable <= 0:
        raise UsageError(
            f"--keep-first {keep_first} and --keep-last {keep_last} protect all {num_layers} blocks, so none can be "
            "removed; lower them (the paper's defaults are 4 and 2)"
        )
    count = remove if remove is not None else round(ratio * num_layers)
    if count < 1:
        raise UsageError(f"--ratio {ratio} of {num_layers} blocks rounds to 0 blocks; use a larger --ratio or --remove")
    if count > removable:
        raise UsageError(
            f"cannot remove {count} of {num_layers} blocks: blocks 0-{keep_first - 1} and the last {keep_last} are "
            f"protected, so only {removable} are removable. Use --remove {removable} or fewer, or lower "
            "--keep-first/--keep-last"
        )
    return count


def candidates(num_layers: int, keep_first: int, keep_last: int) -> list[int]:
    return list(range(keep_first, num_layers - keep_last))


def lowest(scores: dict[int, float], allowed: list[int], count: int) -> list[int]:
    """The `count` allowed blocks with the lowest scores (ties: the lower index), ascending."""
    return sorted(sorted(allowed, key=lambda i: (scores[i], i))[:count])


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of 1 - cos(h_in, h_out), token count) for [..., hidden] tensors, in float32."""
    cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
    return float((1 - cos).double().sum()), cos.numel()


def shortened_config(config: dict, kept: list[int]) -> dict:
    """config.json for the model made of blocks `kept` (old indices, ascending), changing only what
    must change: num_hidden_layers, every per-layer list, and Qwen2's max_window_layers (a
    vision-language checkpoint's in its text_config). A list the config class derives from the layer
    count when absent (Gemma's layer_types, from a sliding pattern) is written out first: derived
    again for fewer layers, it would give the kept blocks other attention kinds."""
    if isinstance(config.get("text_config"), dict):
        return {**config, "text_config": shortened_config(config["text_config"], kept)}
    full = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    derived = {key: getattr(full, key) for key in ("num_hidden_layers", "layer_types") if getattr(full, key, None)}
    config = {**config, **{key: value for key, value in derived.items() if key not in config}}
    num_layers = config["num_hidden_layers"]
    new = dict(config)
    new["num_hidden_layers"] = len(kept)
    for key, value in config.items():
        if isinstance(value, list) and len(value) == num_layers and key != "architectures":
            new[key] = [value[i] for i in kept]
    if isinstance(config.get("max_window_layers"), int):  # layers below it use full attention
        new["max_window_layers"] = sum(1 for i in kept if i < config["max_window_layers"])
    return new


# -- streamed scoring ----------------------------------------------------------------------------------


class Blocks:
    """The source's decoder blocks, streamed in a given order (the next one read in the background
    while this one computes) and built one at a time on the device."""

    def __init__(self, source: Source, batch_size: int, overlap: bool, quiet: bool):
        self.source, self.runner = source, source.runner
        self.batch_size, self.overlap, self.quiet = batch_size, overlap, quiet

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index`'s tensors, checked (on the reading thread)."""
        stored = {}
        for name, local in self.source.layer_names[index].items():
            stored[local] = self.source.checkpoint.read(name, count=False)
            check_weights_finite(stored[local], name)
        return stored

    def stream(self, order: list[int], start: int, desc: str) -> Iterator[tuple[int, int, dict]]:
        """(position, block index, its tensors) for order[start:], with a progress bar that counts
        from 0 (a resumed phase starts part done)."""
        bar = tqdm(desc=desc, initial=start, total=len(order), unit="block", disable=self.quiet, dynamic_ncols=True)
        with LayerReader(self.source, self.overlap, read=self.tensors) as reader:
            for position, (index, stored) in enumerate(reader.layers(order[start:]), start):
                yield position, index, stored
                bar.update()
        bar.close()

    def build(self, index: int, stored: dict[str, torch.Tensor]) -> torch.nn.Module:
        return self.runner.build(index, stored)

    def forward(self, layer: torch.nn.Module, index: int, hidden: torch.Tensor, on_output=None) -> None:
        """hidden [n, seqlen, hidden] on the CPU, replaced in place by the layer's output."""
        forward_batches(self.runner, layer, index, hidden, self.batch_size, write_back=True, on_output=on_output)


class ScoringSaves:
    """Where the scoring is, saved in OUT/.streamprune so that a killed run goes on from its last
    save: after a block when `minutes` have passed since the last save (0: after every block), and
    at the end of every pass and round. A save holds the phase, the next position in it, the partial
    scores, and the tensors the rest needs, so resumed scores are bit-identical to uninterrupted ones.

    Phases: "magnitude", "bi", "ppl" (one per pass), "taylor forward", "taylor backward"."""

    def __init__(self, state: ScoringState, minutes: float, checkpoint, started: float):
        self.state, self.minutes, self.checkpoint, self.started = state, minutes, checkpoint, started
        saved = state.progress or {}
        self.rounds = [{**r, "scores": int_keys(r["scores"])} for r in saved.get("rounds", [])]  # finished rounds
        self.seconds_before = saved.get("seconds", 0.0)  # scoring time of earlier sessions
        checkpoint.bytes_read = saved.get("bytes_read", 0)  # the reads that made the saved results
        self.last_save = time.perf_counter()

    def resume(self, phase: str) -> tuple[int, dict]:
        """(next position, saved data) when the last save is inside `phase` of this round, else (0, {})."""
        saved = self.state.progress
        if saved is None or saved["phase"] != phase or len(saved["rounds"]) != len(self.rounds):
            return 0, {}
        data = dict(saved["data"])
        if "scores" in data:
            data["scores"] = int_keys(data["scores"])
        return saved["position"], data

    def tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.state.tensor(name, out)

    def after_block(self, phase: str, position: int, data: dict, tensors: dict, unchanged=()) -> None:
        """The blocks before `position` in `phase` are done: save when `minutes` have passed."""
        if time.perf_counter() - self.last_save >= self.minutes * 60:
            self.save(phase, position, data, tensors, unchanged)

    def save(self, phase: str | None, position: int, data: dict, tensors: dict, unchanged=()) -> None:
        progress = {
            "rounds": self.rounds,
            "phase": phase,
            "position": position,
            "data": data,
            "bytes_read": self.checkpoint.bytes_read,
            "seconds": self.seconds(),
        }
        self.state.save(progress, tensors, unchanged)
        self.last_save = time.perf_counter()

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started


def int_keys(scores: dict) -> dict[int, float]:
    """Block numbers back from JSON's string keys."""
    return {int(block): score for block, score in scores.items()}


def block_magnitude_scores(blocks: Blocks, model: list[int], saves: ScoringSaves) -> dict[int, float]:
    """Sum of |W| over each block's Linear weights."""
    position, saved = saves.resume("magnitude")
    scores, linears = saved.get("scores", {}), blocks.runner.projections.names
    for position, index, stored in blocks.stream(model, position, "magnitude"):
        scores[index] = sum(float(stored[f"{local}.weight"].double().abs().sum()) for local in linears)
        del stored
        saves.after_block("magnitude", position + 1, {"scores": scores}, {})
    return scores


def bi_scores(blocks: Blocks, model: list[int], hidden: torch.Tensor, saves: ScoringSaves) -> dict[int, float]:
    """hidden: the embedded calibration tokens [n, seqlen, hidden]; consumed."""
    position, saved = saves.resume("bi")
    scores = saved.get("scores", {})
    if position:
        saves.tensor("hidden", out=hidden)  # the input of block model[position]
    for position, index, stored in blocks.stream(model, position, "block influence"):
        sums = [0.0, 0]  # sum of 1 - cos over tokens, tokens

        def add(x: torch.Tensor, y: torch.Tensor) -> None:
            part, tokens = block_influence(x, y)
            sums[0], sums[1] = sums[0] + part, sums[1] + tokens

        blocks.forward(blocks.build(index, stored), index, hidden, on_output=add)
        del stored
        check_activations_finite(hidden, index, in_float32=IN_FLOAT32)
        scores[index] = sums[0] / sums[1]
        saves.after_block("bi", position + 1, {"scores": scores}, {"hidden": hidden})
    return scores


def ppl_scores(
    blocks: Blocks,
    model: list[int],
    embedded: torch.Tensor,
    input_ids: torch.Tensor,
    streams_per_pass: int,
    saves: ScoringSaves,
) -> tuple[dict[int, float], int]:
    """Perplexity with each block of `model` skipped; returns (scores, passes over the weights).

    At block i the main stream (no block skipped) is copied into block i's skip stream, which then
    skips block i; every skip stream started earlier goes through block i like the main one.
    """
    position, saved = saves.resume("ppl")
    scores, passes = saved.get("scores", {}), saved.get("passes", 0)
    first = saved.get("first", 0)  # the first of the blocks whose skip streams this pass carries
    streams_per_pass = saved.get("streams_per_pass", streams_per_pass)  # a resumed pass keeps its group
    head = load_head(blocks.source)
    while first < len(model):
        group = model[first : first + streams_per_pass]
        if position:  # resumed inside this pass
            main = saves.tensor("main")  # [n, seqlen, hidden]
            streams = {i: saves.tensor(f"stream-{i}") for i in saved["streams"]}
        else:
            passes += 1
            main = embedded.clone()
            streams = {}
        for position, index, stored in blocks.stream(model, position, f"ppl pass {passes}"):
            if index in group:
                streams[index] = main.clone()
            layer = blocks.build(index, stored)
            del stored
            for skipped, stream in streams.items():
                if skipped != index:
                    blocks.forward(layer, index, stream)
                    check_activations_finite(stream, index, in_float32=IN_FLOAT32)
            if index < group[-1]:  # the main stream is only needed until the group's last block
                blocks.forward(layer, index, main)
            del layer
            data = {"first": first, "passes": passes, "streams_per_pass": streams_per_pass, "scores": scores,
                    "streams": list(streams)}  # fmt: skip
            tensors = {"main": main, **{f"stream-{i}": stream for i, stream in streams.items()}}
            saves.after_block("ppl", position + 1, data, tensors)
        del main
        for skipped, stream in streams.items():
            scores[skipped] = math.exp(mean_nll(stream, input_ids, head))
        del streams
        first, position = first + streams_per_pass, 0
        data = {"first": first, "passes": passes, "streams_per_pass": streams_per_pass, "scores": scores}
        saves.save("ppl", 0, data, {})
    return scores, passes


def mean_nll(hidden: torch.Tensor, input_ids: torch.Tensor, head) -> float:
    """Mean next-token loss over all samples: hidden [n, seqlen, h] predicts input_ids [n, seqlen]."""
    total = 0.0
    for sample, ids in zip(hidden, input_ids):
        total -= float(token_logprobs(sample[:-1], ids[1:], head).double().sum())
    return total / (input_ids.shape[0] * (input_ids.shape[1] - 1))


def taylor_scores(
    blocks: Blocks, model: list[int], hidden: torch.Tensor, input_ids: torch.Tensor, saves: ScoringSaves
) -> dict[int, float]:
    """Sum over each block's Linear weights of |W * dL/dW|, L the mean next-token loss.

    Forward: every block's input is kept (len(model) x n x seqlen x hidden on the CPU). Then the
    head's gradient dL/dh, and blocks last to first: rebuild, forward the kept input with autograd,
    backward the carried gradient; dL/dW accumulates over micro-batches; dL/dx is carried on.
    """
    backward_from, saved = saves.resume("taylor backward")
    if saved:  # resumed in the reverse pass: the inputs of the blocks not yet done, and dL/dh
        later = list(reversed(model))[backward_from:]
        inputs = {index: saves.tensor(f"input-{index}") for index in later}
        grad, scores = saves.tensor("grad"), saved["scores"]
    else:
        inputs = taylor_forward(blocks, model, hidden, saves)
        grad = head_gradient(blocks, hidden, input_ids)
        del hidden
        scores = {}
        save_taylor(saves, "taylor backward", 0, {"scores": scores}, {"grad": grad}, inputs, always=True)

    reverse = list(reversed(model))
    for position, index, stored in blocks.stream(reverse, backward_from, "taylor backward"):
        layer = blocks.build(index, stored)
        del stored
        scores[index] = block_taylor_score(blocks, layer, index, inputs.pop(index), grad)
        del layer
        save_taylor(saves, "taylor backward", position + 1, {"scores": scores}, {"grad": grad}, inputs)
    return scores


def taylor_forward(blocks: Blocks, model: list[int], hidden: torch.Tensor, saves: ScoringSaves) -> dict:
    """Every block's input kept, {block: [n, seqlen, hidden]}; `hidden` ends as the last block's output."""
    position, _ = saves.resume("taylor forward")
    inputs = {index: saves.tensor(f"input-{index}") for index in model[:position]}
    if position:
        saves.tensor("hidden", out=hidden)
    for position, index, stored in blocks.stream(model, position, "taylor forward"):
        inputs[index] = hidden.clone()
        blocks.forward(blocks.build(index, stored), index, hidden)
        del stored
        check_activations_finite(hidden, index, in_float32=IN_FLOAT32)
        save_taylor(saves, "taylor forward", position + 1, {}, {"hidden": hidden}, inputs)
    return inputs


def head_gradient(blocks: Blocks, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """dL/dh of the last block's output [n, seqlen, hidden]; L = sum of token losses / tokens, so
    samples add up."""
    device = blocks.runner.device
    head = load_head(blocks.source)
    tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
    grad = torch.zeros_like(hidden)
    for k in range(hidden.shape[0]):
        h = hidden[k, :-1].to(device).requires_grad_(True)
        loss = -token_logprobs(h, input_ids[k, 1:], head).sum() / tokens
        loss.backward()
        grad[k, :-1] = h.grad.to("cpu", grad.dtype)
    return grad


def block_taylor_score(blocks: Blocks, layer, index: int, x_all: torch.Tensor, grad: torch.Tensor) -> float:
    """Sum of |W * dL/dW| over the block's Linears, given its kept input x_all [n, seqlen, hidden] and
    dL/d(its output) `grad`, which becomes dL/d(its input) in place."""
    device, size = blocks.runner.device, blocks.batch_size
    for start in range(0, x_all.shape[0], size):
        x = x_all[start : start + size].to(device).requires_grad_(True)
        y = blocks.runner.forward(layer, index, x)
        y.backward(grad[start : start + size].to(device))
        grad[start : start + size].copy_(x.grad)  # no staging copy (stream.forward_batches)
    total = 0.0
    for local in blocks.runner.projections.names:
        weight = layer.get_submodule(local).weight
        total += float((weight.detach() * weight.grad).double().abs().sum())
    return total


def save_taylor(
    saves: ScoringSaves, phase: str, position: int, data: dict, carried: dict, inputs: dict, always=False
) -> None:
    """A taylor resume point: the carried tensor (hidden forward, dL/dh backward) and the kept block
    inputs still to be used, each input written once however many saves name it."""
    names = [f"input-{i}" for i in inputs]
    save = saves.save if always else saves.after_block
    save(phase, position, data, {**carried, **dict(zip(names, inputs.values()))}, unchanged=names)


def score_blocks(
    config: DepthConfig, blocks: Blocks, model: list[int], input_ids, saves: ScoringSaves
) -> tuple[dict, int]:
    """(score per block of `model`, passes over the weights) for config.criterion."""
    if config.criterion == "magnitude":
        return block_magnitude_scores(blocks, model, saves), 1
    hidden = blocks.source.embed(input_ids)  # [n, seqlen, hidden]
    if config.criterion == "bi":
        return bi_scores(blocks, model, hidden, saves), 1
    if config.criterion == "taylor":
        return taylor_scores(blocks, model, hidden, input_ids, saves), 2
    per_pass = streams_per_pass(config, hidden, len(model))
    return ppl_scores(blocks, model, hidden, input_ids, per_pass, saves)


def streams_per_pass(config: DepthConfig, hidden: torch.Tensor, blocks: int) -> int:
    """Skip streams carried in one pass: --max-streams, else as many as half the free RAM holds
    beside the embedded tokens and the main stream."""
    if config.max_streams is not None:
        return min(config.max_streams, blocks)
    stream_bytes = hidden.numel() * hidden.element_size()
    free = available_ram_bytes()
    if free is None:
        return blocks
    return max(1, min(blocks, free // 2 // stream_bytes - 2))


# -- the orchestrator ---------------------------------------------------------------------------------


def depth(config: DepthConfig) -> dict:
    """Score the blocks of `config.model`, and unless --scores-only write the shortened checkpoint
    to `config.out`; returns the report (also written as depth_scores.json)."""
    started = time.perf_counter()
    buffers.return_freed_memory_to_the_system()

    # 1. the source and the settings, all checked before anything is written
    source = open_source(config.model, config.torch_device, config.dtype)
    check_not_source(config.out, source.directory)
    with OutputLock(config.out) as lock:  # taken before the first write; released however this ends
        lock.check()
        check_destination(config.out, "--out")
        count = None
        if not config.scores_only:
            count = removal_count(source.num_layers, config.remove, config.ratio, config.keep_first, config.keep_last)
        calib_path = None if config.criterion == "magnitude" else calibration_path(config.calib)
        structure = scoring_identity(config, source, count, calib_path)
        heal_ids = None
        if config.reconstruct:  # sampled now: bad calibration text is found before anything is written
            heal_ids = healing_ids(config, source, calibration_path(config.calib))
        return score_and_write(config, source, structure, count, calib_path, heal_ids, lock, started)


def score_and_write(
    config: DepthConfig, source: Source, structure: dict, count, calib_path, heal_ids, lock, started
) -> dict:
    """Steps 2-5: the scores (reused or computed), the report, the shortened checkpoint."""
    # 2-3. the scores: reused from an earlier run into --out with these exact settings (stopped
    # while writing, or --scores-only), else computed, going on from a stopped scoring's last save
    allowed = candidates(source.num_layers, config.keep_first, config.keep_last)
    state = None if config.force else ScoringState.load(config.out)
    earlier = None if config.force or state is not None else earlier_scores(config.out, structure)
    if earlier is not None:
        lock.acquire()
        rounds, calibration, scoring_seconds = earlier["rounds"], earlier["calibration"], earlier["scoring_seconds"]
        if not config.iterative:
            rounds[0]["removed"] = lowest(rounds[0]["scores"], allowed, count or 0)
        if not config.quiet:
            print(f"reusing the block scores in {config.out / SCORES_JSON} (same model and settings)", file=sys.stderr)
    else:
        rounds, calibration, scoring_seconds = score(config, source, structure, state, count, calib_path, lock, started)

    # 4. the report: scores per block (JSON, CSV) and the chart, written before the checkpoint
    report = depth_report(config, source, structure, rounds, calibration, scoring_seconds)
    write_json(config.out / SCORES_JSON, report)
    write_atomic(config.out / SCORES_CSV, scores_csv(report).encode())
    from .chart import block_chart_png

    write_atomic(config.out / SCORES_PNG, block_chart_png(report))
    # the scores are durable: the scoring state goes, and so do the weights of an earlier try to
    # write the checkpoint (only our own files can be there: --out was empty or held this run)
    prepare_output_dir(config.out, force=True)
    if config.scores_only:
        return report

    # 5. the shortened checkpoint: kept blocks renumbered 0..K-1, everything else as it was but the
    # blocks healed by --reconstruct
    healed = {}
    if heal_ids is not None:
        healed, report["reconstruct"] = heal_seams(config, source, report["kept"], heal_ids)
    report["output_files"], report["output_bytes"] = write_shortened(config, source, report["kept"], healed)
    report["total_seconds"] = time.perf_counter() - started
    write_json(config.out / RECORD_FILE, report)
    return report


def scoring_identity(config: DepthConfig, source: Source, count: int | None, calib_path: Path | None) -> dict:
    """Everything the scores depend on: the same scores may be reused only when these match."""
    seqlen = source.capped_seqlen(config.seqlen)
    return {
        "source": source_fingerprint(source.checkpoint),
        "criterion": config.criterion,
        "remove": count if config.iterative else None,  # one-shot scores do not depend on how many go
        "keep_first": config.keep_first,
        "keep_last": config.keep_last,
        "iterative": config.iterative,
        "calibration": None if calib_path is None else {"sha256": file_sha256(calib_path), "nsamples": config.nsamples,
                                                        "seqlen": seqlen, "seed": config.seed},
        "dtype": str(source.dtype).removeprefix("torch."),
        "batch_size": config.batch_size,
    }  # fmt: skip


def score(config: DepthConfig, source: Source, structure: dict, state, count, calib_path, lock, started) -> tuple:
    """(rounds, calibration record, scoring seconds): score the blocks, going on from `state` (the
    last save of a stopped scoring in --out) when there is one. --iterative removes one block per
    round and rescores the shorter model."""
    if state is None:
        check_output_dir(config.out, config.force)
    else:
        check_same_structure(state.structure, structure, config.out, "an unfinished depth scoring")
    saved = saved_state(config.out, DEPTH_STATE_FILE)
    calibration = None
    if calib_path is not None:  # every criterion but magnitude; read before --out is created
        seqlen, sha256 = structure["calibration"]["seqlen"], structure["calibration"]["sha256"]
        calibration = sample_calibration(config, calib_path, sha256, source.directory, seqlen)
        source.check_token_ids(calibration["input_ids"])
    lock.acquire()
    if saved_state(config.out, DEPTH_STATE_FILE) != saved:
        raise UsageError(
            f"--out {config.out}: the scoring saved there changed while this command was starting (another "
            "streamprune process?). Nothing was written; run the same command again"
        )
    if state is None:
        check_output_dir(config.out, config.force)
        prepare_output_dir(config.out, config.force)
        state = ScoringState(config.out, structure)
    elif not config.quiet:
        at = f"{state.progress['phase'] or 'a new round'} from position {state.progress['position']}"
        print(f"continuing the block scoring saved in {config.out} ({at})", file=sys.stderr)
    input_ids = None if calibration is None else calibration.pop("input_ids")

    blocks = Blocks(source, config.batch_size, config.overlap, config.quiet)
    saves = ScoringSaves(state, config.checkpoint_minutes, source.checkpoint, started)
    rounds = saves.rounds
    allowed = candidates(source.num_layers, config.keep_first, config.keep_last)
    while len(rounds) < (count if config.iterative and count else 1):
        model = [i for i in range(source.num_layers) if not any(i in r["removed"] for r in rounds)]
        scores, passes = score_blocks(config, blocks, model, input_ids, saves)
        take = 0 if count is None else 1 if config.iterative else count
        chosen = lowest(scores, [i for i in allowed if i in model], take)
        rounds.append({"blocks": model, "scores": scores, "removed": chosen, "passes": passes,
                       "bytes_read": source.checkpoint.bytes_read})  # fmt: skip
        saves.save(None, 0, {}, {})
    return rounds, calibration, saves.seconds()


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


def write_shortened(config: DepthConfig, source: Source, kept: list[int], healed: dict) -> tuple[list[str], int]:
    """The checkpoint of blocks `kept` (renumbered 0..K-1), everything else byte for byte but the
    tensors in `healed` (source name -> trained tensor), and its config.json made consistent;
    returns (shard files, bytes)."""
    info, names = source.checkpoint.tensors, source.layer_names
    renamed = [(name, name) for name in names[None]]
    for new, old in enumerate(kept):
        renamed += [(name, source.names.layer(new) + local) for name, local in names[old].items()]
    writer = CheckpointWriter(
        config.out, [(to, info[src].dtype, info[src].shape) for src, to in renamed], config.max_shard_bytes
    )
    check_free_space(config.out, {"output checkpoint": writer.total_bytes})
    try:
        for source_name, out_name in tqdm(renamed, desc="writing", unit="tensor", disable=config.quiet):
            tensor = healed[source_name] if source_name in healed else source.checkpoint.read(source_name)
            check_weights_finite(tensor, source_name)
            writer.write(out_name, tensor)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    copy_support_files(source.directory, config.out)
    write_json(config.out / "config.json", shortened_config(source.checkpoint.config, kept))
    return writer.files, writer.total_bytes


# -- --reconstruct: healing the seams ------------------------------------------------------------------


def seams(kept: list[int], num_layers: int) -> dict[int, int]:
    """{kept block: the last block of the removed span right after it}. A span at the very start has
    no block before it to heal."""
    found, seam = {}, None
    for index in range(num_layers):
        if index in kept:
            seam = index
        elif seam is not None:
            found[seam] = index  # the span goes on to here
    return found


def healing_ids(config: DepthConfig, source: Source, calib_path: Path) -> torch.Tensor:
    """The calibration windows the seams train on, [reconstruct_nsamples, reconstruct_seqlen]."""
    from types import SimpleNamespace

    seqlen = source.capped_seqlen(config.reconstruct_seqlen)
    settings = SimpleNamespace(calib=config.calib, nsamples=config.reconstruct_nsamples, seed=config.seed)
    calibration = sample_calibration(settings, calib_path, file_sha256(calib_path), source.directory, seqlen)
    source.check_token_ids(calibration["input_ids"])
    return calibration["input_ids"]


def heal_seams(config: DepthConfig, source: Source, kept: list[int], input_ids: torch.Tensor) -> tuple[dict, dict]:
    """One pass over the blocks up to the last removed span, with two streams: the dense model's,
    and the shortened model's (the same until the first seam, so it is split off there). At a seam
    (a kept block followed by a removed span) the block is trained, on the shortened stream's
    inputs, toward the dense stream's output after the span (what the span produced); the
    shortened stream then goes through the trained block. Returns ({source tensor name: trained
    tensor} for the seam blocks, {seam block: first and last epoch's mean loss})."""
    settings = ReconstructSettings(
        config.reconstruct_epochs, config.reconstruct_lr, config.reconstruct_batch_size,
        optimizer=config.reconstruct_optimizer,
    )  # fmt: skip
    span_end = seams(kept, source.num_layers)
    if not span_end:
        return {}, {}
    last = max(span_end.values())  # nothing after the last span is trained
    blocks = Blocks(source, config.batch_size, config.overlap, config.quiet)
    dense = source.embed(input_ids)  # [n, seqlen, hidden]
    shortened = None  # the shortened model's stream, from the first seam on
    healed, losses, seam = {}, {}, None  # seam: (index, layer, tensors) waiting for its span's end
    for _, index, stored in blocks.stream(list(range(last + 1)), 0, "healing seams"):
        layer = blocks.build(index, stored)
        if index in span_end and shortened is None:
            shortened = dense.clone()
        if shortened is not None and index in kept and index not in span_end:
            blocks.forward(layer, index, shortened)
        blocks.forward(layer, index, dense)
        if index in span_end:
            seam = (index, layer, stored)  # its dense output is in `dense`; it trains once the span has run
        if seam is not None and span_end[seam[0]] == index:
            seam_index, seam_layer, seam_stored = seam
            with torch.enable_grad():
                losses[seam_index] = reconstruct_layer(
                    source.runner, seam_layer, seam_index, shortened, dense, settings, config.seed
                )
            for local in trainable(seam_layer, source.runner.projections.names, settings.train_norms):
                name = source.names.layer(seam_index) + local
                healed[name] = seam_layer.get_parameter(local).data.to("cpu", seam_stored[local].dtype)
            if index < last:
                blocks.forward(seam_layer, seam_index, shortened)
            seam = None
        check_activations_finite(dense, index, in_float32=IN_FLOAT32)
    return healed, losses


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
