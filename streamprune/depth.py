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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from . import buffers
from .buffers import available_ram_bytes
from .calibration import file_sha256
from .checkpoint import Checkpoint
from .config import check_choice, check_dtype, check_positive, parse_device, parse_shard_size
from .errors import BadInputError, UsageError
from .evaluate import load_head, token_logprobs
from .families import LAYER_PREFIX, PRUNABLE_LINEARS, LayerStack, family_of
from .pipeline import (
    RECORD_FILE,
    calibration_path,
    check_activations_finite,
    check_not_source,
    check_output_dir,
    check_weights_finite,
    compute_dtype,
    copy_support_files,
    embed,
    layout,
    prepare_output_dir,
    sample_calibration,
)
from .runstate import ScoringState, check_free_space, check_same_structure, source_fingerprint
from .source import resolve_model
from .writer import CheckpointWriter, format_size, write_atomic

CRITERIA = ("ppl", "taylor", "magnitude", "bi")
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
    must change: num_hidden_layers, every per-layer list, and Qwen2's max_window_layers."""
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
    """The source's decoder blocks, built one at a time on the device."""

    def __init__(self, checkpoint: Checkpoint, stack: LayerStack, layer_names: dict, batch_size: int, quiet: bool):
        self.checkpoint, self.stack, self.layer_names = checkpoint, stack, layer_names
        self.batch_size, self.quiet = batch_size, quiet

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        stored = {}
        for name, local in self.layer_names[index].items():
            stored[local] = self.checkpoint.read(name)
            check_weights_finite(stored[local], name)
        return stored

    def build(self, index: int) -> torch.nn.Module:
        return self.stack.build(index, self.tensors(index))

    @torch.no_grad()
    def forward(self, layer: torch.nn.Module, index: int, hidden: torch.Tensor) -> None:
        """hidden [n, seqlen, hidden] on the CPU, replaced in place by the layer's output."""
        for start in range(0, hidden.shape[0], self.batch_size):
            x = hidden[start : start + self.batch_size].to(self.stack.device)
            hidden[start : start + self.batch_size] = self.stack.forward(layer, index, x).to("cpu")

    def progress(self, start: int, stop: int, desc: str):
        """Positions start..stop-1, with a bar that counts from 0 (a resumed phase starts part done)."""
        return tqdm(range(start, stop), desc=desc, initial=start, total=stop, unit="block", disable=self.quiet,
                    dynamic_ncols=True)  # fmt: skip


class Progress:
    """Where the scoring is, saved in OUT/.streamprune so that a killed run goes on from its last
    save: after a block when `minutes` have passed since the last save (0: after every block), and
    at the end of every pass and round. A save holds the phase, the next position in it, the partial
    scores, and the tensors the rest needs, so resumed scores are bit-identical to uninterrupted ones.

    Phases: "magnitude", "bi", "ppl" (one per pass), "taylor forward", "taylor backward"."""

    def __init__(self, state: ScoringState, minutes: float, checkpoint: Checkpoint, started: float):
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


def magnitude_scores(blocks: Blocks, model: list[int], progress: Progress) -> dict[int, float]:
    position, saved = progress.resume("magnitude")
    scores = saved.get("scores", {})
    for position in blocks.progress(position, len(model), "magnitude"):
        index = model[position]
        stored = blocks.tensors(index)
        scores[index] = sum(float(stored[f"{local}.weight"].double().abs().sum()) for local in PRUNABLE_LINEARS)
        progress.after_block("magnitude", position + 1, {"scores": scores}, {})
    return scores


def bi_scores(blocks: Blocks, model: list[int], hidden: torch.Tensor, progress: Progress) -> dict[int, float]:
    """hidden: the embedded calibration tokens [n, seqlen, hidden]; consumed."""
    position, saved = progress.resume("bi")
    scores = saved.get("scores", {})
    if position:
        progress.tensor("hidden", out=hidden)  # the input of block model[position]
    for position in blocks.progress(position, len(model), "block influence"):
        index = model[position]
        layer = blocks.build(index)
        total = count = 0
        with torch.no_grad():
            for start in range(0, hidden.shape[0], blocks.batch_size):
                x = hidden[start : start + blocks.batch_size].to(blocks.stack.device)
                y = blocks.stack.forward(layer, index, x)
                part, tokens = block_influence(x, y)
                total, count = total + part, count + tokens
                hidden[start : start + blocks.batch_size] = y.to("cpu")
        check_activations_finite(hidden, index, "")
        scores[index] = total / count
        progress.after_block("bi", position + 1, {"scores": scores}, {"hidden": hidden})
    return scores


def ppl_scores(
    blocks: Blocks,
    model: list[int],
    embedded: torch.Tensor,
    input_ids: torch.Tensor,
    streams_per_pass: int,
    progress: Progress,
) -> tuple[dict[int, float], int]:
    """Perplexity with each block of `model` skipped; returns (scores, passes over the weights).

    At block i the main stream (no block skipped) is copied into block i's skip stream, which then
    skips block i; every skip stream started earlier goes through block i like the main one.
    """
    position, saved = progress.resume("ppl")
    scores, passes = saved.get("scores", {}), saved.get("passes", 0)
    first = saved.get("first", 0)  # the first of the blocks whose skip streams this pass carries
    streams_per_pass = saved.get("streams_per_pass", streams_per_pass)  # a resumed pass keeps its group
    norm_weight, head = load_head(blocks.checkpoint, blocks.stack.device, blocks.stack.dtype)
    eps = getattr(blocks.stack.config, "rms_norm_eps", 1e-6)
    while first < len(model):
        group = model[first : first + streams_per_pass]
        if position:  # resumed inside this pass
            main = progress.tensor("main")  # [n, seqlen, hidden]
            streams = {i: progress.tensor(f"stream-{i}") for i in saved["streams"]}
        else:
            passes += 1
            main = embedded.clone()
            streams = {}
        for position in blocks.progress(position, len(model), f"ppl pass {passes}"):
            index = model[position]
            if index in group:
                streams[index] = main.clone()
            layer = blocks.build(index)
            for skipped, stream in streams.items():
                if skipped != index:
                    blocks.forward(layer, index, stream)
                    check_activations_finite(stream, index, "")
            if index < group[-1]:  # the main stream is only needed until the group's last block
                blocks.forward(layer, index, main)
            data = {"first": first, "passes": passes, "streams_per_pass": streams_per_pass, "scores": scores,
                    "streams": list(streams)}  # fmt: skip
            tensors = {"main": main, **{f"stream-{i}": stream for i, stream in streams.items()}}
            progress.after_block("ppl", position + 1, data, tensors)
        del main
        for skipped, stream in streams.items():
            scores[skipped] = math.exp(mean_nll(stream, input_ids, norm_weight, head, eps))
        del streams
        first, position = first + streams_per_pass, 0
        data = {"first": first, "passes": passes, "streams_per_pass": streams_per_pass, "scores": scores}
        progress.save("ppl", 0, data, {})
    return scores, passes


def mean_nll(hidden: torch.Tensor, input_ids: torch.Tensor, norm_weight, head, eps: float) -> float:
    """Mean next-token loss over all samples: hidden [n, seqlen, h] predicts input_ids [n, seqlen]."""
    total = 0.0
    for sample, ids in zip(hidden, input_ids):
        total -= float(token_logprobs(sample[:-1], ids[1:], norm_weight, head, eps).double().sum())
    return total / (input_ids.shape[0] * (input_ids.shape[1] - 1))


def taylor_scores(
    blocks: Blocks, model: list[int], hidden: torch.Tensor, input_ids: torch.Tensor, progress: Progress
) -> dict[int, float]:
    """Sum over each block's Linear weights of |W * dL/dW|, L the mean next-token loss.

    Forward: every block's input is kept (len(model) x n x seqlen x hidden on the CPU). Then the
    head's gradient dL/dh, and blocks last to first: rebuild, forward the kept input with autograd,
    backward the carried gradient; dL/dW accumulates over micro-batches; dL/dx is carried on.
    """
    stack, device = blocks.stack, blocks.stack.device
    backward_from, saved = progress.resume("taylor backward")
    if saved:  # resumed in the reverse pass: the inputs of the blocks not yet done, and dL/dh
        later = list(reversed(model))[backward_from:]
        inputs = {index: progress.tensor(f"input-{index}") for index in later}
        grad, scores = progress.tensor("grad"), saved["scores"]
    else:
        position, _ = progress.resume("taylor forward")
        inputs = {index: progress.tensor(f"input-{index}") for index in model[:position]}
        if position:
            progress.tensor("hidden", out=hidden)
        for position in blocks.progress(position, len(model), "taylor forward"):
            index = model[position]
            inputs[index] = hidden.clone()
            blocks.forward(blocks.build(index), index, hidden)
            check_activations_finite(hidden, index, "")
            save_taylor(progress, "taylor forward", position + 1, {}, {"hidden": hidden}, inputs)

        # dL/dh of the last block's output; L = sum of token losses / tokens, so chunks add up
        norm_weight, head = load_head(blocks.checkpoint, device, stack.dtype)
        eps = getattr(stack.config, "rms_norm_eps", 1e-6)
        tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
        grad = torch.zeros_like(hidden)
        for k in range(hidden.shape[0]):
            h = hidden[k, :-1].to(device).requires_grad_(True)
            loss = -token_logprobs(h, input_ids[k, 1:], norm_weight, head, eps).sum() / tokens
            loss.backward()
            grad[k, :-1] = h.grad.to("cpu", grad.dtype)
        del hidden, head
        scores = {}
        save_taylor(progress, "taylor backward", 0, {"scores": scores}, {"grad": grad}, inputs, always=True)

    reverse = list(reversed(model))
    for position in blocks.progress(backward_from, len(reverse), "taylor backward"):
        index = reverse[position]
        layer = blocks.build(index)
        x_all = inputs.pop(index)
        for start in range(0, x_all.shape[0], blocks.batch_size):
            x = x_all[start : start + blocks.batch_size].to(device).requires_grad_(True)
            y = stack.forward(layer, index, x)
            y.backward(grad[start : start + blocks.batch_size].to(device))
            grad[start : start + blocks.batch_size] = x.grad.to("cpu")
        scores[index] = sum(
            float(
                (layer.get_submodule(local).weight.detach() * layer.get_submodule(local).weight.grad)
                .double()
                .abs()
                .sum()
            )
            for local in PRUNABLE_LINEARS
        )
        del layer, x_all
        save_taylor(progress, "taylor backward", position + 1, {"scores": scores}, {"grad": grad}, inputs)
    return scores


def save_taylor(
    progress: Progress, phase: str, position: int, data: dict, carried: dict, inputs: dict, always=False
) -> None:
    """A taylor resume point: the carried tensor (hidden forward, dL/dh backward) and the kept block
    inputs still to be used, each input written once however many saves name it."""
    names = [f"input-{i}" for i in inputs]
    save = progress.save if always else progress.after_block
    save(phase, position, data, {**carried, **dict(zip(names, inputs.values()))}, unchanged=names)


def score_blocks(
    config: DepthConfig, blocks: Blocks, model: list[int], input_ids, dtype, progress: Progress
) -> tuple[dict, int]:
    """(score per block of `model`, passes over the weights) for config.criterion."""
    if config.criterion == "magnitude":
        return magnitude_scores(blocks, model, progress), 1
    hidden = embed(blocks.checkpoint, input_ids, dtype)  # [n, seqlen, hidden]
    if config.criterion == "bi":
        return bi_scores(blocks, model, hidden, progress), 1
    if config.criterion == "taylor":
        return taylor_scores(blocks, model, hidden, input_ids, progress), 2
    per_pass = streams_per_pass(config, hidden, len(model))
    return ppl_scores(blocks, model, hidden, input_ids, per_pass, progress)


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
    source_dir = resolve_model(config.model)
    checkpoint = Checkpoint(source_dir)
    family = family_of(checkpoint.config)
    num_layers = checkpoint.config["num_hidden_layers"]
    check_not_source(config.out, source_dir)
    count = None
    if not config.scores_only:
        count = removal_count(num_layers, config.remove, config.ratio, config.keep_first, config.keep_last)
    dtype = compute_dtype(config, checkpoint)
    stack = LayerStack(source_dir, family, config.torch_device, dtype)
    layer_names = layout(checkpoint, stack, num_layers)
    seqlen = min(config.seqlen, getattr(stack.config, "max_position_embeddings", None) or config.seqlen)
    calib_path = None if config.criterion == "magnitude" else calibration_path(config)
    structure = {  # everything the scores depend on: the same scores may be reused only when these match
        "source": source_fingerprint(checkpoint),
        "criterion": config.criterion,
        "remove": count if config.iterative else None,  # one-shot scores do not depend on how many go
        "keep_first": config.keep_first,
        "keep_last": config.keep_last,
        "iterative": config.iterative,
        "calibration": None if calib_path is None else {"sha256": file_sha256(calib_path), "nsamples": config.nsamples,
                                                        "seqlen": seqlen, "seed": config.seed},
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": config.batch_size,
    }  # fmt: skip
    allowed = candidates(num_layers, config.keep_first, config.keep_last)
    # an unfinished scoring in --out goes on from its last save; finished scores are reused
    state = None if config.force else ScoringState.load(config.out)
    earlier = None if config.force or state is not None else earlier_scores(config.out, structure)

    if earlier is not None:
        # 2-3. an earlier run into --out (stopped while writing, or --scores-only) scored with these
        # exact settings: its scores are reused, the expensive part is not redone
        rounds, calibration, scoring_seconds = earlier["rounds"], earlier["calibration"], earlier["scoring_seconds"]
        if not config.iterative:
            rounds[0]["removed"] = lowest(rounds[0]["scores"], allowed, count or 0)
        if not config.quiet:
            print(f"reusing the block scores in {config.out / SCORES_JSON} (same model and settings)", file=sys.stderr)
    else:
        if state is None:
            check_output_dir(config.out, config.force)
            prepare_output_dir(config.out, config.force)
            state = ScoringState(config.out, structure)
        else:
            check_same_structure(state.structure, structure, config.out, "an unfinished depth scoring")
            if not config.quiet:
                at = f"{state.progress['phase'] or 'a new round'} from position {state.progress['position']}"
                print(f"continuing the block scoring saved in {config.out} ({at})", file=sys.stderr)
        # 2. calibration token ids (every criterion but magnitude)
        calibration = None
        if calib_path is not None:
            calibration = sample_calibration(config, calib_path, structure["calibration"]["sha256"], source_dir, seqlen)
            vocab = checkpoint.tensors["model.embed_tokens.weight"].shape[0]
            if int(calibration["input_ids"].max()) >= vocab:
                raise BadInputError(f"the tokenizer in {source_dir} produced ids beyond the embedding's {vocab} rows")
        input_ids = None if calibration is None else calibration.pop("input_ids")

        # 3. score; --iterative removes one block per round and rescores the shorter model; progress
        # is saved in --out as it goes (a resumed run starts from the last save)
        blocks = Blocks(checkpoint, stack, layer_names, config.batch_size, config.quiet)
        progress = Progress(state, config.checkpoint_minutes, checkpoint, started)
        rounds = progress.rounds
        while len(rounds) < (count if config.iterative and count else 1):
            model = [i for i in range(num_layers) if not any(i in r["removed"] for r in rounds)]
            scores, passes = score_blocks(config, blocks, model, input_ids, dtype, progress)
            take = 0 if count is None else 1 if config.iterative else count
            chosen = lowest(scores, [i for i in allowed if i in model], take)
            rounds.append({"blocks": model, "scores": scores, "removed": chosen, "passes": passes,
                           "bytes_read": checkpoint.bytes_read})  # fmt: skip
            progress.save(None, 0, {}, {})
        scoring_seconds = progress.seconds()
    removed = sorted(i for r in rounds for i in r["removed"])
    model = [i for i in range(num_layers) if i not in removed]

    # 4. the report: scores per block (JSON, CSV) and the chart, written before the checkpoint
    report = {
        "streamprune": __version__,
        "model": config.model,
        "directory": str(source_dir),
        "criterion": config.criterion,
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "num_hidden_layers": num_layers,
        "protected": [i for i in range(num_layers) if i not in allowed],
        "removed": removed,
        "kept": model,
        "blocks": [
            {"block": i, "score": rounds[0]["scores"][i], "protected": i not in allowed, "removed": i in removed}
            for i in range(num_layers)
        ],
        "rounds": rounds,
        "calibration": calibration,
        "structure": structure,
        "bytes_read": rounds[-1]["bytes_read"],
        "checkpoint_bytes": checkpoint.total_bytes,
        "passes": sum(r["passes"] for r in rounds),
        "scoring_seconds": scoring_seconds,
        "device": str(stack.device),
        "compute_dtype": str(dtype).removeprefix("torch."),
    }
    write_atomic(config.out / SCORES_JSON, (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(config.out / SCORES_CSV, scores_csv(report).encode())
    from .chart import block_chart_png

    write_atomic(config.out / SCORES_PNG, block_chart_png(report))
    # the scores are durable: the scoring state goes, and so do the weights of an earlier try to
    # write the checkpoint (only our own files can be there: --out was empty or held this run)
    prepare_output_dir(config.out, force=True)
    if config.scores_only:
        return report

    # 5. the shortened checkpoint: kept blocks renumbered 0..K-1, everything else as it was
    info = checkpoint.tensors
    renamed = [(name, name) for name in layer_names[None]]
    for new, old in enumerate(model):
        renamed += [(name, LAYER_PREFIX.format(index=new) + local) for name, local in layer_names[old].items()]
    writer = CheckpointWriter(
        config.out, [(to, info[src].dtype, info[src].shape) for src, to in renamed], config.max_shard_bytes
    )
    check_free_space(config.out, {"output checkpoint": writer.total_bytes})
    try:
        for source_name, out_name in tqdm(renamed, desc="writing", unit="tensor", disable=config.quiet):
            tensor = checkpoint.read(source_name)
            check_weights_finite(tensor, source_name)
            writer.write(out_name, tensor)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    copy_support_files(source_dir, config.out)
    shortened = shortened_config(checkpoint.config, model)
    write_atomic(config.out / "config.json", (json.dumps(shortened, indent=2) + "\n").encode())
    report["output_files"] = writer.files
    report["output_bytes"] = writer.total_bytes
    report["total_seconds"] = time.perf_counter() - started
    write_atomic(config.out / RECORD_FILE, (json.dumps(report, indent=2) + "\n").encode())
    return report


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
    lines.append(f"scores: {SCORES_JSON}, {SCORES_CSV}, chart: {SCORES_PNG}")
    return "\n".join(lines)
