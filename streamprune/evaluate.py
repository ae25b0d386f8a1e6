"""Streaming evaluation: perplexity and zero-shot accuracy, each layer read once.

All evaluation sequences are embedded into one flat CPU buffer [tokens, hidden] (or a file-backed
one with `offload_dir`); then layer 0 runs over all of them, then layer 1, and so on, exactly like
the pruning loop. Only at the end do the final norm and the LM head turn hidden states into the
log-probabilities of the scored tokens, a chunk of tokens at a time, so that a 128k vocabulary
never materialises logits for the whole set.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import buffers
from .buffers import available_ram_bytes
from .checkpoint import Checkpoint
from .config import check_dtype, check_positive, parse_device
from .errors import BadInputError, ResourceError, UsageError
from .families import EMBEDDING, LayerStack, family_of
from .pipeline import check_activations_finite, check_weights_finite, compute_dtype, embed, layout
from .source import resolve_model
from .tasks import TASKS, load_task
from .writer import format_size

_HEAD_CHUNK_BYTES = 256 * 1024 * 1024  # logits of one chunk of tokens, float32


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
    """The harness's _encode_pair: trailing spaces move to the continuation, and the continuation's
    tokens are those of context+continuation beyond the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    return context_ids, whole[len(context_ids) :]


def pair_sequence(tokenizer, context: str, continuation: str, max_length: int) -> Sequence:
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    if not continuation_ids:
        raise BadInputError(f"continuation {continuation!r} encodes to no tokens")
    tokens = (context_ids + continuation_ids)[-(max_length + 1) :]  # left-truncated, as the harness does
    return Sequence(tokens, max(1, len(tokens) - len(continuation_ids)))


def ppl_windows(tokenizer, text: str, seqlen: int, limit: int | None) -> list[Sequence]:
    """Non-overlapping windows of `seqlen` tokens of the whole text (the Wanda/SparseGPT convention)."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False).input_ids
    count = len(ids) // seqlen
    if count == 0:
        raise BadInputError(f"the perplexity text has {len(ids)} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        count = min(count, limit)
    return [Sequence(ids[i * seqlen : (i + 1) * seqlen], 1) for i in range(count)]


def evaluate(config: EvalConfig) -> dict:
    """Perplexity and/or zero-shot accuracy of `config.model`, streamed; returns the results."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    buffers.return_freed_memory_to_the_system()
    # 1. the model: checked as for pruning; nothing is loaded whole
    source_dir = resolve_model(config.model)
    checkpoint = Checkpoint(source_dir)
    family = family_of(checkpoint.config)
    num_layers = checkpoint.config["num_hidden_layers"]
    dtype = compute_dtype(config, checkpoint)
    stack = LayerStack(source_dir, family, config.torch_device, dtype)
    layer_names = layout(checkpoint, stack, num_layers)
    seqlen = min(config.seqlen, getattr(stack.config, "max_position_embeddings", None) or config.seqlen)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir)
    except Exception as err:
        raise BadInputError(f"cannot load the tokenizer from {source_dir}: {err}") from err

    # 2. every sequence to score: perplexity windows, then one per (example, choice)
    sequences: list[Sequence] = []
    ppl_range = None
    if config.ppl is not None:
        path = Path(config.ppl).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise BadInputError(f"--ppl {config.ppl}: cannot read it ({err})") from err
        windows = ppl_windows(tokenizer, text, seqlen, config.limit)
        ppl_range = (0, len(windows))
        sequences += windows
    task_examples = {}
    for task in config.tasks:
        examples = load_task(task, Path(config.data_dir), config.limit)
        first = len(sequences)
        for example in examples:
            sequences += [pair_sequence(tokenizer, c, t, seqlen) for c, t in example.pairs]
        task_examples[task] = (examples, first)

    # 3. stream: all sequences through each layer in turn; then the head
    logprobs = stream_logprobs(checkpoint, stack, layer_names, sequences, config, dtype)

    # 4. metrics
    results: dict = {"model": config.model, "directory": str(source_dir), "seqlen": seqlen}
    if ppl_range is not None:
        nll = -sum(float(logprobs[i].double().sum()) for i in range(*ppl_range))
        scored = sum(logprobs[i].numel() for i in range(*ppl_range))
        results["perplexity"] = {
            "file": str(config.ppl),
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
def stream_logprobs(checkpoint, stack, layer_names, sequences, config, dtype) -> list[torch.Tensor]:
    """Log-probabilities (float32, CPU) of each sequence's scored tokens."""
    device = stack.device
    lengths = [len(s.inputs) for s in sequences]
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    flat_ids = torch.tensor([t for s in sequences for t in s.inputs], dtype=torch.int64)
    vocab, width = checkpoint.tensors[EMBEDDING].shape
    if int(flat_ids.max()) >= vocab:
        raise BadInputError(f"the tokenizer produced token id {int(flat_ids.max())}; the embedding has {vocab} rows")
    hidden = activation_buffer(len(flat_ids), width, dtype, config.offload_dir)  # [tokens, hidden]
    embed(checkpoint, flat_ids.unsqueeze(0), dtype, out=hidden.unsqueeze(0))

    # micro-batches of similar lengths, right-padded: under a causal mask a padded position is
    # never attended to by the real ones before it, so their outputs are those of the unpadded sequence.
    # Sorted by length, a batch's last sequence is its longest; a new batch starts when padding to it
    # would exceed batch_tokens or waste more than a fifth of the batch.
    order = sorted(range(len(sequences)), key=lambda i: lengths[i])
    batches, current, current_tokens = [], [], 0
    for i in order:
        padded = (len(current) + 1) * lengths[i]
        real = current_tokens + lengths[i]
        if current and (padded > config.batch_tokens or padded - real > max(64, padded // 5)):
            batches.append(current)
            current, current_tokens = [], 0
        current.append(i)
        current_tokens += lengths[i]
    if current:
        batches.append(current)

    num_layers = len(layer_names) - 1
    progress = tqdm(range(num_layers), desc="evaluating", unit="layer", disable=config.quiet, dynamic_ncols=True)
    for index in progress:
        stored = {local: checkpoint.read(name) for name, local in layer_names[index].items()}
        for name, local in layer_names[index].items():
            check_weights_finite(stored[local], name)
        layer = stack.build(index, stored)
        del stored
        for batch in batches:
            longest = max(lengths[i] for i in batch)
            x = torch.zeros(len(batch), longest, width, dtype=dtype, device=device)  # [b, longest, hidden]
            for row, i in enumerate(batch):
                x[row, : lengths[i]] = hidden[offsets[i] : offsets[i + 1]].to(device)
            y = stack.forward(layer, index, x)
            for row, i in enumerate(batch):
                hidden[offsets[i] : offsets[i + 1]] = y[row, : lengths[i]].to("cpu")
                buffers.release(hidden, slice(offsets[i], offsets[i + 1]))
        check_activations_finite(hidden, index, "")
        del layer
    progress.close()

    norm_weight, head = load_head(checkpoint, device, dtype)
    eps = getattr(stack.config, "rms_norm_eps", 1e-6)
    results = []
    for i, sequence in enumerate(sequences):
        start = offsets[i] + sequence.target_start - 1  # the position that predicts the first target
        targets = torch.tensor(sequence.tokens[sequence.target_start :], dtype=torch.int64)
        results.append(token_logprobs(hidden[start : start + len(targets)], targets, norm_weight, head, eps))
    return results


def load_head(checkpoint, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The final RMSNorm weight [hidden] and lm_head [vocab, hidden] (the embedding when tied)."""
    head_name = "lm_head.weight" if "lm_head.weight" in checkpoint.tensors else EMBEDDING
    norm_weight, head = checkpoint.read("model.norm.weight"), checkpoint.read(head_name)
    check_weights_finite(norm_weight, "model.norm.weight")
    check_weights_finite(head, head_name)
    return norm_weight.to(device, dtype), head.to(device, dtype)


def token_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, norm_weight: torch.Tensor, head: torch.Tensor, eps: float
) -> torch.Tensor:
    """log p(targets[t] | hidden[t]) as float32 on the CPU, for the last layer's outputs hidden
    [T, hidden_size] and targets [T]: final norm, then the head, a chunk of tokens at a time so
    that the float32 logits [chunk, vocab] stay under _HEAD_CHUNK_BYTES."""
    chunk = max(1, _HEAD_CHUNK_BYTES // (head.shape[0] * 4))
    pieces = []
    for first in range(0, len(targets), chunk):
        h = hidden[first : first + chunk].to(head.device)
        logits = torch.nn.functional.linear(rms_norm(h, norm_weight, eps), head).float()  # [chunk, vocab]
        picked = targets[first : first + chunk].to(head.device)
        pieces.append((logits.log_softmax(-1).gather(1, picked.unsqueeze(1)).squeeze(1)).cpu())
    return torch.cat(pieces)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic: float32 variance, then back to the input dtype before the weight."""
    dtype = hidden.dtype
    h = hidden.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


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
    from .writer import write_atomic

    write_atomic(Path(path), (json.dumps(results, indent=2) + "\n").encode())
