"""What a streamed `streamprune eval` will need, from config.json and the tasks' sizes alone
(`streamprune plan MODEL --tasks ... --ppl FILE`): peak RAM and VRAM, bytes read, FLOPs of the
layers and of the final norm and LM head, time.

Eval embeds every evaluation token into one buffer [tokens, hidden] (evaluate.stream_hidden), pushes
all of it through layer 0, then layer 1, ..., then scores each request's continuation with the head
(evaluate.stream_logprobs): so memory grows with the tokens of all the tasks together, and the head's
time with the tokens it scores. Every term in bytes, FLOPs or seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import FLOAT_DTYPES as DTYPES
from ..config import check_dtype
from ..errors import UsageError
from ..families import family_of, text_config
from ..sizes import format_size
from ..source import fetch_config
from ..stream import _HEAD_CHUNK_BYTES
from .commands import plan_device
from .geometry import Geometry
from .memory import (
    TOKENIZER_BYTES_PER_VOCAB_ENTRY,
    Settings,
    _embedding_ram,
    _forward_bytes,
    current_rss_bytes,
    default_limits,
)
from .report import duration


@dataclass(frozen=True)
class TaskSize:
    """One multiple-choice task as lm-evaluation-harness 0.4.13 (and the built-in tasks) score it:
    one request per (document, choice), each a context + continuation sequence."""

    examples: int  # documents in the split the harness scores
    choices: float  # requests per document
    tokens: float  # context + continuation tokens of one request, BOS not counted
    scored: float  # its continuation's tokens: what the LM head scores


# examples: the split each harness task YAML scores (test_split, else validation_split): boolq 3,270
# (super_glue validation), rte 277 (glue validation), hellaswag 10,042 (validation), winogrande 1,267
# (winogrande_xl validation), arc_easy 2,376 and arc_challenge 1,172 (test), openbookqa 500 (main
# test), piqa 1,838 (validation); the local copies in ../shared/data/zeroshot hold the same counts.
# choices and tokens: measured on those local copies through the harness's prompts (tasks.py) with
# SmolLM2-135M's tokenizer (49k BPE; Qwen2.5's 151k one gave within 3%); a 32k tokenizer such as
# Llama 2's makes somewhat more. RTE is not among the local files: 75 tokens assumed (a news
# premise of two or three sentences and a one-line hypothesis, "True"/"False" one token each).
TASK_SIZES = {
    "boolq": TaskSize(3270, 2, 152.4, 1.0),
    "rte": TaskSize(277, 2, 75.0, 1.0),
    "hellaswag": TaskSize(10042, 4, 79.1, 29.3),
    "winogrande": TaskSize(1267, 2, 22.5, 5.6),
    "arc_easy": TaskSize(2376, 3.999, 31.7, 4.4),
    "arc_challenge": TaskSize(1172, 3.999, 37.1, 5.9),
    "openbookqa": TaskSize(500, 4, 15.0, 3.3),
    "piqa": TaskSize(1838, 2, 36.3, 22.9),
}
# --ppl FILE: its tokens guessed from its size (SmolLM2's tokenizer: 4.25 bytes a token on
# WikiText-2's test file; smaller vocabularies make more tokens)
PPL_BYTES_PER_TOKEN = 4.0
# token ids held per evaluation token: each request's Python list of ints (36.5 bytes a token,
# measured with tracemalloc on tokenizer output), the flat list and the int64 tensor built from it
IDS_BYTES_PER_TOKEN = 36 + 8 + 8
# what the head holds beside its weight while it scores a chunk of tokens: the logits in the compute
# dtype, their float32 copy and its log-softmax (stream.token_logprobs), _HEAD_CHUNK_BYTES a float32 one
HEAD_CHUNK_COPIES = 2.5
# a GPU eval copies each micro-batch from the (pageable) buffer to the device and back, at every
# layer, in sequence with its compute: PCIe 4.0 x16 moves pageable memory at about this (assumed)
HOST_COPY_BYTES_PER_SECOND = 10e9
# eval refuses a buffer in RAM over this share of the RAM available (evaluate.activation_buffer)
BUFFER_RAM_SHARE = 0.8


@dataclass(frozen=True)
class Workload:
    """Every sequence eval streams: their inputs go through every layer, their targets through the head."""

    sequences: int
    tokens: int  # inputs, through every layer: each sequence's length less its last token
    scored: int  # tokens whose log-probability the head computes
    square_tokens: int  # sum over sequences of their input length squared (attention's work)
    longest: int  # a typical longest sequence, for the micro-batches' shape
    parts: dict = field(default_factory=dict)  # per task (and "perplexity"): requests or windows, tokens


def eval_workload(tasks: list[str], limit: int | None, ppl_bytes: int | None, seqlen: int) -> Workload:
    """The sequences of `tasks` (at most `limit` documents each) and of a --ppl text of `ppl_bytes`
    cut into windows of `seqlen` tokens (at most `limit`). A BOS is counted before every request (as
    a tokenizer that adds one makes them; one token more than needed for those that do not)."""
    kinds, parts = [], {}  # (sequences, inputs of each, scored tokens of each)
    for name in tasks:
        size = TASK_SIZES[name]
        requests = round(min(size.examples, limit or size.examples) * size.choices)
        inputs = min(size.tokens + 1, seqlen + 1) - 1  # BOS + text, less the last token; truncated as eval does
        kinds.append((requests, inputs, size.scored))
        parts[name] = {"requests": requests, "tokens": round(requests * inputs)}
    if ppl_bytes is not None:
        windows = int(ppl_bytes / PPL_BYTES_PER_TOKEN) // seqlen
        windows = min(windows, limit) if limit is not None else windows
        kinds.append((windows, seqlen - 1, seqlen - 1))  # a window's last token predicts nothing
        parts["perplexity"] = {"windows": windows, "tokens": windows * (seqlen - 1)}
    return Workload(
        sequences=sum(n for n, _, _ in kinds),
        tokens=round(sum(n * inputs for n, inputs, _ in kinds)),
        scored=round(sum(n * scored for n, _, scored in kinds)),
        square_tokens=round(sum(n * inputs**2 for n, inputs, _ in kinds)),
        longest=max([math.ceil(inputs) for n, inputs, _ in kinds if n] or [1]),
        parts=parts,
    )


@dataclass
class EvalSettings:
    stored_bytes: int = 2
    compute_bytes: int = 2
    device: str = "cpu"  # "cpu" or "cuda"
    batch_tokens: int = 8192  # eval's --batch-tokens
    offload: str = "cpu"  # the buffer in RAM ("cpu") or in a file (eval's --offload-dir: "disk")
    overlap: bool = True
    runtime_bytes: int = 0


def _micro_batch(work: Workload, s: EvalSettings) -> Settings:
    """One micro-batch as the run's memory model sees it: batch_tokens of the longest sequences."""
    batch = max(1, s.batch_tokens // work.longest)
    return Settings(nsamples=batch, seqlen=work.longest, batch_size=batch, stored_bytes=s.stored_bytes,
                    compute_bytes=s.compute_bytes, device=s.device, offload=s.offload)  # fmt: skip


def eval_estimate(g: Geometry, work: Workload, s: EvalSettings) -> dict:
    """Peak RAM (by step) and VRAM, bytes read, FLOPs of the layers and of the head."""
    on_cpu, micro = s.device == "cpu", _micro_batch(work, s)
    buffer = work.tokens * g.hidden * s.compute_bytes  # [tokens, hidden]
    resident = buffer if s.offload == "cpu" else min(buffer, s.batch_tokens * g.hidden * s.compute_bytes * 2)
    stored_layer, forward = g.layer_params * s.stored_bytes, _forward_bytes(g, micro)
    head_stored = g.vocab * g.hidden * s.stored_bytes
    head_work = head_stored * s.compute_bytes // s.stored_bytes + int(HEAD_CHUNK_COPIES * _HEAD_CHUNK_BYTES)
    cpu_copy = 0 if s.compute_bytes == s.stored_bytes else g.layer_params * s.compute_bytes
    ram_by_step = {
        "embed": _embedding_ram(g, micro, work.tokens, buffer),  # offloaded: the pages a run of tokens touches
        # the layer computed and, with overlap, the next one being read
        "layers": resident + stored_layer * (2 if s.overlap else 1) + ((cpu_copy + forward) if on_cpu else 0),
        # the head read (on a CPU also computed there), and every request's log-probabilities
        "final norm + LM head": resident + (head_stored + head_work if on_cpu else head_stored) + work.scored * 4,
    }  # fmt: skip
    ids, tokenizer = work.tokens * IDS_BYTES_PER_TOKEN, g.vocab * TOKENIZER_BYTES_PER_VOCAB_ENTRY
    heaviest = max(ram_by_step, key=ram_by_step.get)
    peak_vram = None if on_cpu else max(g.layer_params * s.compute_bytes + forward, head_work + g.hidden * 4)
    # the same forward as a run's (memory._compute): the Linears, and attention over each sequence
    layer_flops = g.layers * (2 * g.active_linear_params * work.tokens + 2 * g.heads * g.head_dim * work.square_tokens)
    offloaded_io = 2 * g.layers * buffer if s.offload == "disk" else 0  # each layer reads and rewrites the file
    return {
        "tokens": work.tokens,
        "scored_tokens": work.scored,
        "sequences": work.sequences,
        "parts": work.parts,
        "layer_bytes": stored_layer,
        "buffer_bytes": buffer,
        "offload": s.offload,
        "ram_by_step": ram_by_step,
        "peak_ram_bytes": s.runtime_bytes + tokenizer + ids + ram_by_step[heaviest],
        "peak_ram_parts": {
            "runtime (python, torch, transformers)": s.runtime_bytes,
            "tokenizer": tokenizer,
            "token ids": ids,
            "activation buffer": resident,
            f"the heaviest step ({heaviest})": ram_by_step[heaviest] - resident,
        },
        "peak_vram_bytes": peak_vram,
        # every layer once, the embedding's rows to embed, and the head (the embedding again when tied)
        "bytes_read": g.layers * stored_layer + 2 * head_stored + g.hidden * s.stored_bytes,
        "head_bytes_read": head_stored + g.hidden * s.stored_bytes,
        "offloaded_buffer_bytes_moved": offloaded_io,
        "host_device_bytes_copied": 0 if on_cpu else 2 * g.layers * buffer,
        "layer_flops": layer_flops,
        "head_flops": 2 * g.vocab * g.hidden * work.scored,
        "flops": layer_flops + 2 * g.vocab * g.hidden * work.scored,
    }


def eval_seconds(plan: dict, rates: dict, read_bytes_per_second: float, write_bytes_per_second: float,
                 overlap: bool) -> dict:  # fmt: skip
    """Compute (the layers, then the head, at the device's forward rate) and I/O. The checkpoint's
    layers are read while the last one computes (overlap, on a GPU); an offloaded buffer is read and
    rewritten by the micro-batches themselves, in sequence with their compute; the head runs after
    the last layer, its read and its work overlapping nothing."""
    layers, head = plan["layer_flops"] / rates["forward"], plan["head_flops"] / rates["forward"]
    head_io = plan["head_bytes_read"] / read_bytes_per_second
    layers_io = plan["bytes_read"] / read_bytes_per_second - head_io
    moved = plan["offloaded_buffer_bytes_moved"] / 2  # read, and as much written
    buffer_io = moved / read_bytes_per_second + moved / write_bytes_per_second
    copies = plan["host_device_bytes_copied"] / HOST_COPY_BYTES_PER_SECOND
    streamed = max(layers, layers_io) if overlap else layers + layers_io
    return {"layers": layers, "head": head + head_io, "compute": layers + head, "copies": copies,
            "io": layers_io + buffer_io + head_io, "total": streamed + copies + buffer_io + head + head_io}  # fmt: skip


def fit_eval(g: Geometry, work: Workload, s: EvalSettings, max_ram: int | None, max_vram: int | None,
             offload: str) -> tuple[dict, list[str]]:  # fmt: skip
    """The plan, and what does not fit, each with what would: `offload` auto keeps the buffer in RAM
    where it fits, else plans it in a file (eval --offload-dir)."""
    def ram_ok(plan: dict) -> bool:
        in_ram = plan["buffer_bytes"] if s.offload == "cpu" else 0
        free = None if max_ram is None else max_ram - s.runtime_bytes
        return free is None or (plan["peak_ram_bytes"] <= max_ram and in_ram <= BUFFER_RAM_SHARE * free)

    s.offload = "cpu" if offload in ("auto", "cpu") else "disk"
    plan = eval_estimate(g, work, s)
    if offload == "auto" and not ram_ok(plan):
        s.offload = "disk"
        plan = eval_estimate(g, work, s)
    problems = []
    if not ram_ok(plan):
        need = f"needs about {format_size(plan['peak_ram_bytes'])} of RAM, more than the {format_size(max_ram)} free"
        hint = "add --offload-dir DIR to eval (plan it with --offload disk)" if s.offload == "cpu" else "lower --limit"
        problems.append(f"{need}: {hint}")
    if max_vram is not None and plan["peak_vram_bytes"] is not None and plan["peak_vram_bytes"] > max_vram:
        need = f"needs about {format_size(plan['peak_vram_bytes'])} of GPU memory, more than {format_size(max_vram)}"
        problems.append(f"{need}: lower --batch-tokens (now {s.batch_tokens}), or use --device cpu")
    return plan, problems


def plan_eval(model: str, tasks: list[str], ppl: str | None = None, limit: int | None = None, seqlen: int = 2048,
              dtype: str = "auto", device: str = "auto", batch_tokens: int = 8192, offload: str = "auto",
              max_ram: int | None = None, max_gpu_memory: int | None = None, overlap: bool = True,
              read_bytes_per_second: float = 2e9,
              write_bytes_per_second: float | None = None) -> tuple[str, dict]:  # fmt: skip
    """`streamprune plan MODEL --tasks ... [--ppl FILE]`: the report and the numbers of a streamed
    `streamprune eval` of those tasks (the sizes in TASK_SIZES) and perplexity text."""
    check_dtype(dtype)
    unknown = [task for task in tasks if task not in TASK_SIZES]
    if unknown:
        raise UsageError(
            f"--tasks {','.join(unknown)}: plan knows the sizes of {', '.join(TASK_SIZES)}; plan another task's "
            "eval by naming a known one of similar size (requests x tokens)"
        )
    ppl_bytes = None if ppl is None else _text_bytes(ppl)
    config, where = fetch_config(model)
    family_of(config).classes()  # eval's heavy imports, so that the runtime measured below is eval's
    g = Geometry.from_config(config)
    stored = DTYPES.get(config.get("torch_dtype") or config.get("dtype") or "float32", torch.float32)
    compute = stored if dtype == "auto" else DTYPES[dtype]
    seqlen = min(seqlen, text_config(config).get("max_position_embeddings") or seqlen)  # as eval caps it
    work = eval_workload(tasks, limit, ppl_bytes, seqlen)
    if not work.tokens:
        raise UsageError(f"--ppl {ppl}: about {ppl_bytes / PPL_BYTES_PER_TOKEN:,.0f} tokens, not one window of "
                         f"--seqlen {seqlen}; give a longer text or a shorter --seqlen")  # fmt: skip
    shape = (max(1, batch_tokens // work.longest), work.longest)
    device_name, rates, kind, max_gpu_memory = plan_device(device, compute, max_gpu_memory, config, shape)
    settings = EvalSettings(stored.itemsize, compute.itemsize, kind, batch_tokens, overlap=overlap,
                            runtime_bytes=current_rss_bytes())  # fmt: skip
    if max_ram is None:
        max_ram = default_limits(settings.runtime_bytes, None)[0]
    plan, problems = fit_eval(g, work, settings, max_ram, max_gpu_memory, offload)
    write_bytes_per_second = write_bytes_per_second or 1e9
    times = None
    if rates is not None:
        times = eval_seconds(plan, rates, read_bytes_per_second, write_bytes_per_second, overlap and kind == "cuda")
    head = (
        f"{model}: {config.get('architectures', ['?'])[0]}, {g.layers} layers, hidden {g.hidden}, vocabulary "
        f"{g.vocab:,}, stored {str(stored).removeprefix('torch.')}, compute {str(compute).removeprefix('torch.')} "
        f"(config from {where})\nlimits: RAM {format_size(max_ram) if max_ram else 'unknown'}"
        + (f", GPU memory {format_size(max_gpu_memory)}" if kind == "cuda" and max_gpu_memory else "")
        + f"; disk read {read_bytes_per_second / 1e9:g} GB/s, write {write_bytes_per_second / 1e9:g} GB/s (assumed)"
    )
    text = head + "\n" + eval_report(plan, settings, times, device_name, problems, seqlen)
    numbers = {**plan, "settings": {**settings.__dict__, "seqlen": seqlen, "tasks": tasks, "ppl": ppl, "limit": limit},
               "assumptions": ASSUMPTIONS, "limits": {"ram_bytes": max_ram, "gpu_bytes": max_gpu_memory},
               "seconds": times, "device": device_name, "fits": not problems, "problems": problems}  # fmt: skip
    return text, numbers


ASSUMPTIONS = (
    "tokens per request measured with SmolLM2's tokenizer on the local task files (RTE's assumed), a BOS added to "
    f"each; a 32k tokenizer such as Llama 2's makes somewhat more; --ppl text at {PPL_BYTES_PER_TOKEN:g} bytes a "
    "token; micro-batch padding (at most a fifth) not counted"
)


def _text_bytes(ppl: str) -> int:
    try:
        return Path(ppl).expanduser().stat().st_size
    except OSError as err:
        raise UsageError(f"--ppl {ppl}: cannot read it ({err.strerror}); give the text file eval will read") from err


def eval_report(plan: dict, s: EvalSettings, times: dict | None, device_name: str, problems: list[str],
                seqlen: int) -> str:  # fmt: skip
    """The eval plan as the lines a user reads before `streamprune eval`."""
    parts = plan["parts"]
    requests = {name: p for name, p in parts.items() if name != "perplexity"}
    tasks = ", ".join(f"{name} {p['requests']:,} x {p['tokens'] / p['requests']:.0f}" for name, p in requests.items()
                      if p["requests"])  # fmt: skip
    windows = parts.get("perplexity", {}).get("windows")
    where = "in RAM" if s.offload == "cpu" else (
        f"in a file: run eval with --offload-dir DIR on a disk with {format_size(plan['buffer_bytes'])} free"
    )  # fmt: skip
    ram_parts = ", ".join(f"{name} {format_size(n)}" for name, n in plan["peak_ram_parts"].items() if n)
    lines = [
        (
            f"eval plan: {plan['sequences']:,} sequences, {plan['tokens'] / 1e6:.2f} M tokens through every layer, "
            f"{plan['scored_tokens'] / 1e6:.2f} M scored by the final norm and LM head"
        ),
        *([f"  tasks      requests x tokens: {tasks}"] if tasks else []),
        *([f"  perplexity {windows:,} windows of {seqlen} tokens"] if windows is not None else []),
        f"  assumed    {ASSUMPTIONS}",
        f"  buffer     {format_size(plan['buffer_bytes'])} ([tokens, hidden] in {8 * s.compute_bytes}-bit), {where}",
        f"  peak RAM   {format_size(plan['peak_ram_bytes'])} ({ram_parts})",
    ]
    if plan["peak_vram_bytes"] is not None:
        what = f"one layer and a micro-batch of {s.batch_tokens} tokens, or the head and its logits"
        lines.append(f"  peak VRAM  {format_size(plan['peak_vram_bytes'])} ({what}; the CUDA context adds ~0.5 GB)")
    moved = plan["offloaded_buffer_bytes_moved"]
    rewritten = f"; the buffer's file read and rewritten at every layer, {format_size(moved)} in all" if moved else ""
    layers, head = plan["layer_flops"] / 1e12, plan["head_flops"] / 1e12
    lines += [
        f"  I/O        read {format_size(plan['bytes_read'])} (every layer once, the embedding, the head){rewritten}",
        f"  compute    {layers:,.1f} TFLOP through the layers, then {head:,.1f} TFLOP in the final norm and LM head",
    ]
    if times is not None:
        copies = f", copies to and from the GPU {duration(times['copies'])}" if times["copies"] else ""
        lines.append(f"  time       ~{duration(times['total'])} on {device_name} (layers {duration(times['layers'])}, "
                     f"then the head {duration(times['head'])}; I/O {duration(times['io'])}{copies})")  # fmt: skip
    lines += [f"  does not fit: {problem}" for problem in problems] or ["  fits the limits"]
    return "\n".join(lines)
