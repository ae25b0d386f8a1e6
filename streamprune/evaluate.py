"""Streaming evaluation: perplexity and zero-shot accuracy, each layer read once.

All evaluation sequences are embedded into one flat CPU buffer [tokens, hidden] (or a file-backed
one with `offload_dir`); then layer 0 runs over all of them, then layer 1, and so on, exactly like
the pruning loop. Only at the end do the final norm and the LM head turn hidden states into the
log-probabilities of the scored tokens, a chunk of tokens at a time, so that a 128k vocabulary
never materialises logits for the whole set.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import buffers
from .buffers import available_ram_bytes
from .config import check_choice, check_dtype, check_positive, check_window, parse_device
from .data import ppl_text, zeroshot_folder
from .errors import BadInputError, ResourceError, UsageError
from .outdir import check_destination, check_not_source, write_json
from .sizes import format_size
from .stream import (
    LayerReader,
    Source,
    check_activations_finite,
    head_bar,
    load_head,
    open_source,
    token_logprobs,
)
from .tasks import TASKS, hf_encode, load_task


@dataclass
class EvalConfig:
    model: str
    ppl: str | None = None  # a text file: perplexity over its non-overlapping windows
    tasks: list[str] = field(default_factory=list)
    data_dir: str | None = None  # the zeroshot layout (see tasks.py)
    seqlen: int = 2048  # perplexity window and longest zero-shot sequence; capped at the model's
    limit: int | None = None  # at most this many examples per task and perplexity windows
    device: str = "auto"
    dtype: str = "auto"
    batch_tokens: int = 8192  # tokens per micro-batch (padding included)
    offload_dir: str | None = None  # keep the activation buffer in a file there instead of RAM
    expert_weights: str = "gpu"  # or "cpu": a MoE layer's routed experts in RAM, each visiting the GPU
    overlap: bool = True  # read the next layer while this one computes
    quiet: bool = False

    def __post_init__(self):
        if self.ppl is None and not self.tasks:
            raise UsageError("nothing to evaluate: give --ppl FILE and/or --tasks (e.g. --tasks arc_easy,piqa)")
        for task in self.tasks:
            if task not in TASKS:
                raise UsageError(f"unknown task {task!r}; choose from: {', '.join(TASKS)}")
        if self.tasks and self.data_dir is None:
            raise UsageError("--tasks needs --data-dir, the directory holding the task files (zeroshot layout)")
        check_positive(self, "seqlen", "batch_tokens", "limit")
        check_window(self.seqlen, "--seqlen")
        check_choice("--expert-weights", self.expert_weights, ("gpu", "cpu"))
        check_dtype(self.dtype)
        self.torch_device = parse_device(self.device)


@dataclass
class Sequence:
    """tokens[target_start:] are scored, each given the tokens before it."""

    tokens: list[int]
    target_start: int

    @property
    def inputs(self) -> list[int]:
        return self.tokens[:-1]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's _encode_pair with the hf backend's tok_encode: trailing spaces move to the
    continuation, both texts get the tokenizer's default special tokens (BOS for Gemma and Llama,
    tasks.hf_encode), and the continuation's tokens are those of context+continuation beyond the
    context's (so a BOS belongs to the context)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = hf_encode(tokenizer, context + continuation)
    context_ids = hf_encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def pair_sequence(tokenizer, context: str, continuation: str, max_length: int) -> Sequence:
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    if not continuation_ids:
        raise BadInputError(f"continuation {continuation!r} encodes to no tokens")
    tokens = (context_ids + continuation_ids)[-(max_length + 1) :]  # left-truncated, as the harness does
    return Sequence(tokens, max(1, len(tokens) - len(continuation_ids)))


def ppl_windows(tokenizer, text: str, seqlen: int, limit: int | None) -> list[Sequence]:
    """Non-overlapping windows of `seqlen` tokens of the whole text (the Wanda/SparseGPT convention)."""
    ids = leading_ids(tokenizer, text, None if limit is None else limit * seqlen)
    count = len(ids) // seqlen
    if count == 0:
        raise BadInputError(f"the perplexity text has {len(ids)} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        count = min(count, limit)
    return [Sequence(ids[i * seqlen : (i + 1) * seqlen], 1) for i in range(count)]


_CHARS_PER_TOKEN = 8  # generous: English runs 3-5 characters a token; a short guess only costs a retry


def leading_ids(tokenizer, text: str, needed: int | None) -> list[int]:
    """The token ids of `text`, or at least its first `needed` (all of them where the text is
    shorter). A tokenizer's memory grows with its input (a 30 MB line took gigabytes), so with a
    limit only a prefix is tokenized: the cut can change the tokens just before it, so a prefix is
    trusted once doubling it leaves its first `needed` ids as they were."""
    def encode(part: str) -> list[int]:
        return tokenizer(part, return_attention_mask=False, verbose=False).input_ids

    if needed is None:
        return encode(text)
    chars = max(needed * _CHARS_PER_TOKEN, 4096)
    ids = encode(text[:chars])
    while chars < len(text):
        chars *= 2
        longer = encode(text[:chars])
        if len(ids) > needed and ids[:needed] == longer[:needed]:
            return longer[:needed]
        ids = longer
    return ids


def evaluate(config: EvalConfig) -> dict:
    """Perplexity and/or zero-shot accuracy of `config.model`, streamed; returns the results."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    buffers.return_freed_memory_to_the_system()
    # 1. the model: checked as for pruning; nothing is loaded whole
    source = open_source(config.model, config.torch_device, config.dtype)
    if config.expert_weights == "cpu":
        source.runner.expert_device = torch.device("cpu")
    if config.offload_dir is not None:
        check_not_source(Path(config.offload_dir).expanduser(), source.directory, "--offload-dir")
        check_destination(Path(config.offload_dir), "--offload-dir")
    seqlen = source.capped_seqlen(config.seqlen)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.directory)
    except Exception as err:
        raise BadInputError(f"cannot load the tokenizer from {source.directory}: {err}") from err

    # 2. every sequence to score: perplexity windows, then one per (example, choice)
    sequences: list[Sequence] = []
    ppl_range = None
    if config.ppl is not None:
        text, ppl_from = ppl_text(config.ppl, config.data_dir)
        windows = ppl_windows(tokenizer, text, seqlen, config.limit)
        ppl_range = (0, len(windows))
        sequences += windows
    task_examples = {}
    for task in config.tasks:
        examples = load_task(task, zeroshot_folder(config.data_dir), config.limit)
        first = len(sequences)
        for example in examples:
            sequences += [pair_sequence(tokenizer, c, t, seqlen) for c, t in example.pairs]
        task_examples[task] = (examples, first)

    # 3. stream: all sequences through each layer in turn; then the head
    logprobs = stream_logprobs(source, sequences, config)

    # 4. metrics
    results: dict = {"model": config.model, "directory": str(source.directory), "seqlen": seqlen}
    if ppl_range is not None:
        nll = -sum(float(logprobs[i].double().sum()) for i in range(*ppl_range))
        scored = sum(logprobs[i].numel() for i in range(*ppl_range))
        results["perplexity"] = {
            "file": ppl_from,
            "windows": ppl_range[1] - ppl_range[0],
            "tokens": (ppl_range[1] - ppl_range[0]) * seqlen,
            "scored_tokens": scored,
            "ppl": math.exp(nll / scored),
        }
    results["tasks"] = {}
    for task, (examples, first) in task_examples.items():
        results["tasks"][task] = score_task(examples, logprobs, first)
    if results["tasks"]:
        accs = [r["acc"] for r in results["tasks"].values()]
        results["average_acc"] = sum(accs) / len(accs)
    results["seconds"] = time.perf_counter() - started
    return results


def score_task(examples, logprobs, first: int) -> dict:
    """acc: the choice with the highest log-likelihood; acc_norm: highest per byte of the choice.
    The examples' choices are logprobs[first], logprobs[first + 1], ... in order."""
    correct = correct_norm = 0
    predictions = []
    position = first
    for example in examples:
        lls = [float(logprobs[position + i].double().sum()) for i in range(len(example.pairs))]
        position += len(example.pairs)
        pred = max(range(len(lls)), key=lls.__getitem__)
        predictions.append(pred)
        correct += pred == example.gold
        if example.choice_bytes is not None:
            norm = [ll / n for ll, n in zip(lls, example.choice_bytes)]
            correct_norm += max(range(len(norm)), key=norm.__getitem__) == example.gold
    n = len(examples)
    has_norm = n and examples[0].choice_bytes is not None
    return {
        "n": n,
        "acc": correct / n,
        "acc_norm": correct_norm / n if has_norm else None,
        "predictions": predictions,
    }


def activation_buffer(tokens: int, width: int, dtype: torch.dtype, offload_dir: str | None) -> torch.Tensor:
    """[tokens, width] in RAM (refused when it would not fit), or memory-mapped in `offload_dir`."""
    if offload_dir is None:
        needed, available = tokens * width * dtype.itemsize, available_ram_bytes()
        if available is not None and needed > 0.8 * available:
            raise ResourceError(
                f"the evaluation activations ({tokens:,} tokens x {width} x {dtype.itemsize} bytes = "
                f"{format_size(needed)}) do not fit in the {format_size(available)} of RAM available; add "
                "--offload-dir DIR to keep them in a file on a disk with that much free space, or lower --limit"
            )
    return buffers.activation_buffer((tokens, width), dtype, None if offload_dir is None else Path(offload_dir))


@torch.no_grad()
def stream_logprobs(source: Source, sequences: list[Sequence], config, score=token_logprobs) -> list:
    """`score(hidden, targets, head)` of each sequence's scored tokens: by default their
    log-probabilities (float32, CPU). `config`: EvalConfig, or anything with stream_hidden's fields.
    The head's work has a bar of its own, after the layers' (stream.head_bar)."""
    hidden, offsets = stream_hidden(source, sequences, config)
    bar = head_bar(sum(len(s.tokens) - s.target_start for s in sequences), config.quiet)
    head = load_head(source)
    results = []
    for i, sequence in enumerate(sequences):
        start = offsets[i] + sequence.target_start - 1  # the position that predicts the first target
        targets = torch.tensor(sequence.tokens[sequence.target_start :], dtype=torch.int64)
        results.append(score(hidden[start : start + len(targets)], targets, head))
        buffers.release(hidden, slice(start, start + len(targets)))
        bar.update(len(targets))
    bar.close()
    return results


@torch.no_grad()
def stream_hidden(source: Source, sequences: list[Sequence], config) -> tuple[torch.Tensor, list[int]]:
    """Every sequence's inputs through all decoder layers, each layer read once: the last layer's
    outputs as one flat buffer [tokens, hidden], and where each sequence starts in it (offsets[i]).
    `config` is anything with EvalConfig's offload_dir, batch_tokens, overlap and quiet (the
    harness backend passes its own)."""
    lengths = [len(s.inputs) for s in sequences]
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    flat_ids = torch.tensor([t for s in sequences for t in s.inputs], dtype=torch.int64)
    source.check_token_ids(flat_ids)
    width = source.runner.config.hidden_size
    hidden = activation_buffer(len(flat_ids), width, source.dtype, config.offload_dir)  # [tokens, hidden]
    # shown from the embedding on: filling a buffer of millions of tokens takes a while too
    bar = tqdm(desc="evaluating", unit="layer", total=source.num_layers, disable=config.quiet, dynamic_ncols=True)
    source.embed(flat_ids.unsqueeze(0), out=hidden.unsqueeze(0))
    batches = length_batches(lengths, config.batch_tokens)
    with LayerReader(source, config.overlap) as reader:
        for index, stored in reader.layers(list(range(source.num_layers))):
            source.check_layer_finite(index, stored)
            layer = source.runner.build(index, stored)
            del stored
            forward_padded(source, layer, index, hidden, batches, lengths, offsets)
            check_activations_finite(hidden, index, in_float32="evaluate with --dtype float32")
            del layer
            bar.update()
    bar.close()
    return hidden, offsets


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Micro-batches of sequences of similar lengths, to be right-padded: under a causal mask a
    padded position is never attended to by the real ones before it, so their outputs are those of
    the unpadded sequence. Sorted by length, a batch's last sequence is its longest; a new batch
    starts when padding to it would exceed batch_tokens or waste more than a fifth of the batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current, current_tokens = [], [], 0
    for i in order:
        padded = (len(current) + 1) * lengths[i]
        real = current_tokens + lengths[i]
        if current and (padded > batch_tokens or padded - real > max(64, padded // 5)):
            batches.append(current)
            current, current_tokens = [], 0
        current.append(i)
        current_tokens += lengths[i]
    if current:
        batches.append(current)
    return batches


def forward_padded(source: Source, layer, index: int, hidden, batches, lengths, offsets) -> None:
    """Every sequence of the flat buffer `hidden` [tokens, hidden] through `layer`, in place, a
    right-padded micro-batch at a time."""
    device, width = source.runner.device, hidden.shape[1]
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        x = torch.zeros(len(batch), longest, width, dtype=source.dtype, device=device)  # [b, longest, hidden]
        for row, i in enumerate(batch):
            x[row, : lengths[i]] = hidden[offsets[i] : offsets[i + 1]].to(device)
        y = source.runner.forward(layer, index, x)
        for row, i in enumerate(batch):
            hidden[offsets[i] : offsets[i + 1]].copy_(y[row, : lengths[i]])  # no staging copy (stream.forward_batches)
            buffers.release(hidden, slice(offsets[i], offsets[i + 1]))


def results_table(results: dict) -> str:
    lines = []
    if "perplexity" in results:
        p = results["perplexity"]
        lines.append(f"perplexity {p['ppl']:.3f} ({p['windows']} windows x {results['seqlen']} tokens of {p['file']})")
    if results.get("tasks"):
        lines.append(f"{'task':<14} {'n':>6} {'acc':>7} {'acc_norm':>9}")
        for task, r in results["tasks"].items():
            norm = f"{r['acc_norm']:.4f}" if r["acc_norm"] is not None else "-"
            lines.append(f"{task:<14} {r['n']:>6} {r['acc']:>7.4f} {norm:>9}")
        lines.append(f"{'average acc':<14} {'':>6} {results['average_acc']:>7.4f}")
    return "\n".join(lines)


def write_results(results: dict, path: str) -> None:
    write_json(Path(path), results)
