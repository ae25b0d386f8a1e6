"""The memory model of a run: peak RAM by step and VRAM, disk, bytes moved and FLOPs, from the
geometry and the run's settings; and the plan that fits this machine's limits.

`estimate()` is pure arithmetic over the model's geometry and the run's settings. Its RAM is
estimated per step of the run, under the step names below, which the run's `@step` methods
(pipeline/layers.py, pipeline/owl.py) carry too: the run records the steps it took (and the resident size after each) under the same
names, a test checks that the two sets agree, and benchmarks/memory.py compares them by measurement.
What a method holds (its statistics, its scratch) the method reports itself (methods/base.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..buffers import EMBEDDING_SLICE_BYTES, OFFLOADED_TOKENS_PER_COPY, available_ram_bytes
from ..config import keep_block
from ..methods import Target, method_named
from ..methods.wanda import InputSqNorm
from ..sizes import format_size
from .geometry import Geometry

# The steps of a run whose memory is estimated, as the run's `@step` methods name them.
COPY_OUTSIDE = "copy outside tensors"
EMBED = "embed calibration tokens"
OUTLIER_PASS = "outlier pass"  # --allocation owl only
DENSE_FORWARD = "dense forward"
PRUNE = "prune"
RECONSTRUCT = "reconstruct"  # --reconstruct only
WRITE_AND_PROPAGATE = "write and propagate"
# what a loaded fast tokenizer keeps resident, per entry of its vocabulary: part of the planned peak
# that benchmarks/RESULTS.md compares with the measured one ("Peak memory of `streamprune run`")
TOKENIZER_BYTES_PER_VOCAB_ENTRY = 1024


def _pinned_bytes(g: Geometry, stored_bytes: int) -> int:
    """One layer read into pinned memory, whose allocator rounds every block up to a power of two."""
    sizes = [rows * cols * stored_bytes for rows, cols in g.linear_shapes().values()] + [2 * g.hidden * stored_bytes]
    return sum(1 << (size - 1).bit_length() for size in sizes)


@dataclass
class Settings:
    method: str = "wanda"
    method_options: dict = field(default_factory=dict)  # e.g. sparsegpt's blocksize; None: the default
    allocation: str = "uniform"  # or "owl": a first pass over every layer measures their outliers
    sequential: bool = False  # one forward per input site instead of one per layer to collect statistics
    reconstruct: object = None  # reconstruct.ReconstructSettings of --reconstruct, or None
    pattern: str | None = None  # "N:M", or None for unstructured sparsity
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 1
    stored_bytes: int = 2  # bytes per weight in the checkpoint
    compute_bytes: int = 2  # bytes per value in the compute dtype
    device: str = "cpu"  # "cpu" or "cuda"
    offload: str = "cpu"  # where the activation buffer lives: "cpu" (RAM) or "disk"
    # where a mixture-of-experts layer's routed experts live on a GPU run: "gpu" (the whole layer
    # there) or "cpu" (each visits the GPU while it computes; their statistics and pruning on the CPU)
    expert_weights: str = "gpu"
    overlap: bool = True
    checkpoint_every: int | None = None  # None: the fewest layers that keep within WRITE_BUDGET
    runtime_bytes: int = 0  # python + torch + transformers, resident before any model work

    def __post_init__(self):
        self.batch_size = min(self.batch_size, self.nsamples)  # a micro-batch holds at most every sample


def estimate(geometry: Geometry, settings: Settings) -> dict:
    """Peak RAM (by step) and VRAM, disk needed, bytes read and written, FLOPs. Every term in bytes."""
    g, s = geometry, settings
    method = method_named(s.method, **s.method_options)
    target = Target(sparsity=0.5, keep_block=keep_block(s.pattern))  # how many go does not change memory
    prune_calibrated = method.needs_calibration or s.reconstruct is not None  # the pruning pass streams
    owl = s.allocation == "owl"  # a first pass streams them too, for any method
    calibrated = prune_calibrated or owl
    tokens = s.nsamples * s.seqlen
    stored_layer = g.layer_params * s.stored_bytes
    buffer = tokens * g.hidden * s.compute_bytes if calibrated else 0  # [nsamples, seqlen, hidden]
    buffer *= 2 if s.reconstruct else 1  # and the dense stream's
    on_cpu = s.device == "cpu"
    statistics, forward, outliers = _pass_bytes(g, s, method, prune_calibrated, owl)
    # Pruning one Linear: the method's own scratch (scores, sort, mask), the largest Linear's; off
    # the CPU path the masks of all seven Linears are kept on the CPU until they are applied.
    prune_scratch = max(method.prune_scratch_bytes(rows, cols, target) for rows, cols in g.linear_shapes().values())
    training = _reconstruct_bytes(g, s) if s.reconstruct else 0
    ram_by_step = _ram_by_step(g, s, buffer, forward, statistics, prune_scratch, prune_calibrated, outliers)
    experts_in_ram = not on_cpu and s.expert_weights == "cpu" and g.experts > 0
    peak_vram = None
    if not on_cpu:
        peak_vram = _peak_vram(g, s, method, target, (statistics, forward, outliers, training), prune_calibrated,
                               ram_by_step if experts_in_ram else None)  # fmt: skip
    if training:
        ram_by_step[RECONSTRUCT] = ram_by_step[PRUNE] - (prune_scratch if on_cpu else 0) + (training if on_cpu else 0)
    tokenizer = g.vocab * TOKENIZER_BYTES_PER_VOCAB_ENTRY if calibrated else 0
    heaviest = max(ram_by_step, key=ram_by_step.get)
    peak_ram = s.runtime_bytes + tokenizer + tokens * 8 + ram_by_step[heaviest]

    outside_bytes = g.outside_params * s.stored_bytes
    checkpoint_bytes = g.layers * stored_layer + outside_bytes
    # a resume point saves the buffer after every --checkpoint-every layers but the last, in each pass
    passes = int(prune_calibrated) + int(owl)
    every = s.checkpoint_every or checkpoint_every_within_budget(g.layers, passes, buffer, checkpoint_bytes)
    resume_points = (math.ceil(g.layers / every) - 1) * passes
    forward_flops, statistic_flops, prune_flops, prune_steps = _compute(g, s, method, owl)
    in_buffer = buffer if s.offload == "cpu" else 0
    return {
        "params": g.layers * g.layer_params + g.outside_params,
        "experts": (g.experts, g.experts_per_token),
        "experts_in_ram": experts_in_ram,
        "checkpoint_bytes": checkpoint_bytes,
        "layer_bytes": stored_layer,
        "buffer_bytes": buffer,
        "peak_ram_bytes": peak_ram,
        "ram_by_step": ram_by_step,  # beside the runtime, the tokenizer and the calibration ids
        "peak_ram_parts": {
            "runtime (python, torch, transformers)": s.runtime_bytes,
            "tokenizer and calibration ids": tokenizer + tokens * 8,
            "activation buffer": in_buffer,
            f"the heaviest step ({heaviest})": ram_by_step[heaviest] - in_buffer,
        },
        "peak_vram_bytes": peak_vram,
        # read: every tensor once, and the embedding rows again to embed the calibration tokens
        # (the outlier pass reads every layer once more)
        "bytes_read": checkpoint_bytes + (g.vocab * g.hidden * s.stored_bytes if calibrated else 0)
        + (g.layers * stored_layer if owl else 0),
        # written: the output, and an activation checkpoint at every resume point but the last
        "bytes_written": checkpoint_bytes + resume_points * buffer,
        "checkpoint_every": every,
        "resume_points": resume_points,
        "disk_bytes": {
            "output checkpoint": checkpoint_bytes,
            "activation checkpoints": 2 * buffer if g.layers > 1 else 0,
            "offloaded buffer": buffer if s.offload == "disk" else 0,
        },
        "forward_flops": forward_flops,
        "statistic_flops": statistic_flops,
        "prune_flops": prune_flops,
        "prune_steps": prune_steps,
        "flops": forward_flops + statistic_flops + prune_flops,
        # every pruned weight is checked, scored, sorted (or selected), masked and counted once
        "pruned_weights": g.layers * g.linear_params,
    }


# The resume points' activation files may add at most this share of the output's size to what a
# run writes: a 70B run saving its 4 GiB buffer after each of 80 layers would write 444 GiB, 3.4x
# its output, SSD wear its owner did not ask for.
WRITE_BUDGET = 0.2


def checkpoint_every_within_budget(layers: int, passes: int, buffer_bytes: int, checkpoint_bytes: int) -> int:
    """The default --checkpoint-every: the fewest layers between resume points whose activation
    files (one buffer per resume point, in each of `passes` streamed passes) stay within
    WRITE_BUDGET x the output checkpoint. `layers` means no resume point before the end."""
    for every in range(1, layers + 1):
        if (math.ceil(layers / every) - 1) * passes * buffer_bytes <= WRITE_BUDGET * checkpoint_bytes:
            return every
    return layers


def _compute(g: Geometry, s: Settings, method, owl: bool) -> tuple[int, int, int, int]:
    """(forward FLOPs, statistics' FLOPs, prune FLOPs, prune steps) of the whole run."""
    tokens = s.nsamples * s.seqlen
    flops_per_forward = 2 * g.active_linear_params * tokens + 2 * s.nsamples * g.heads * g.head_dim * s.seqlen * s.seqlen
    forward_flops = g.layers * (_forwards_per_layer(s, method.needs_calibration) + int(owl)) * flops_per_forward
    prune_flops = g.layers * sum(method.prune_flops(rows, cols) for rows, cols in g.linear_shapes().values())
    prune_steps = g.layers * sum(method.prune_steps(rows, cols) for rows, cols in g.linear_shapes().values())
    statistic_flops = 0  # added token by token in the dense forward (SparseGPT's: a float32 matmul)
    if method.needs_calibration:
        statistic = method.statistic.flops_per_token
        # an expert's sites see its share of the tokens (experts_per_token of every `experts`)
        share = {site: g.experts_per_token / g.experts if site.startswith("expert ") else 1 for site in g.site_widths()}
        statistic_flops = g.layers * tokens * sum(statistic(width) * share[site] for site, width in g.site_widths().items())
    return forward_flops, statistic_flops, prune_flops, prune_steps


def _pass_bytes(g: Geometry, s: Settings, method, prune_calibrated: bool, owl: bool) -> tuple[int, int, int]:
    """(statistics, forward, outliers): what the method's statistics hold at once (all input sites);
    one micro-batch's forward with the statistic's temporaries (0 when the pruning pass runs none);
    the outlier pass's peak beside the layer (the same forward collecting Wanda's statistic, then one
    Linear's float32 scores and their comparison with the threshold at a time; 0 without OWL)."""
    widths = g.site_widths().values()
    statistics = sum(method.statistic.held_bytes(w) for w in widths) if method.needs_calibration else 0
    forward = 0
    if prune_calibrated:
        forward = _forward_bytes(g, s)
        forward += max(method.statistic.scratch_bytes(s.seqlen, w) for w in widths) if method.needs_calibration else 0
    outliers = 0
    if owl:
        largest_linear = max(rows * cols for rows, cols in g.linear_shapes().values())
        outliers = _forward_bytes(g, s) + max(InputSqNorm.scratch_bytes(s.seqlen, w) for w in widths)
        outliers = max(outliers, largest_linear * (4 + 1)) + sum(InputSqNorm.held_bytes(w) for w in widths)
    return statistics, forward, outliers


def _peak_vram(g: Geometry, s: Settings, method, target: Target, passes: tuple[int, int, int, int],
               prune_calibrated: bool, ram_by_step: dict[str, int] | None) -> int:  # fmt: skip
    """A GPU run's peak: the layer's own copy and the statistics; each Linear's pruned weight replaces
    (frees) its dense one, so one extra Linear at a time, beside the method's scratch; or the outlier
    pass, or --reconstruct's training. `passes`: (statistics, forward, outliers, training) bytes.
    `ram_by_step` given: the routed experts are kept in RAM (--expert-weights cpu), their part goes there."""
    statistics, forward, outliers, training = passes
    compute_copy = g.layer_params * s.compute_bytes  # the layer built in the compute dtype
    on_gpu = g.linear_shapes()
    if ram_by_step is not None:
        ram, vram_weights, vram_statistics, moved = _experts_in_ram(g, s, method, target, prune_calibrated)
        for step_name, extra in ram.items():
            ram_by_step[step_name] += extra
        compute_copy -= vram_weights
        statistics -= vram_statistics
        forward += moved  # an expert's statistic is made on the GPU, then moved
        on_gpu = {name: shape for name, shape in on_gpu.items() if not name.startswith("expert ")}
    largest_linear = max(rows * cols for rows, cols in on_gpu.values())  # its mask: a byte a weight
    prune_scratch = max(method.prune_scratch_bytes(rows, cols, target, on_gpu=True) for rows, cols in on_gpu.values())
    peak = compute_copy + statistics + max(prune_scratch + largest_linear * (1 + s.compute_bytes), forward)
    return max(peak, compute_copy + outliers, compute_copy + training)


def _experts_in_ram(g: Geometry, s: Settings, method, target: Target, prune_calibrated: bool
                    ) -> tuple[dict[str, int], int, int, int]:  # fmt: skip
    """--expert-weights cpu on a GPU run: what the RAM holds instead of the GPU, by step (the
    experts' statistics and pruning, and compute-dtype copies where it differs from the stored
    one), what leaves the GPU: the routed experts' weights but the computing one's, and their
    statistics; and what add_batch makes on the GPU to move to an expert's statistic in RAM."""
    expert_linears = {name: shape for name, shape in g.linear_shapes().items() if name.startswith("expert ")}
    expert_params = sum(rows * cols for rows, cols in expert_linears.values())
    widths = {site: w for site, w in g.site_widths().items() if site.startswith("expert ")}
    held = sum(method.statistic.held_bytes(w) for w in widths.values()) if method.needs_calibration else 0
    # built from the read tensors: no copy where the compute dtype is the stored one
    weights = 0 if s.stored_bytes == s.compute_bytes else expert_params * s.compute_bytes
    largest_expert = max(rows * cols for rows, cols in expert_linears.values())
    scratch = max(method.prune_scratch_bytes(rows, cols, target) for rows, cols in expert_linears.values())
    ram = {PRUNE: weights + held + scratch + largest_expert * s.compute_bytes, WRITE_AND_PROPAGATE: weights}
    moved = 0
    if method.needs_calibration and prune_calibrated:  # and the product each add_batch moves here
        moved = max(method.statistic.moved_bytes(w) for w in widths.values())
        ram[DENSE_FORWARD] = weights + held + moved
    return ram, (expert_params - expert_params // g.experts) * s.compute_bytes, held, moved


def _forwards_per_layer(s: Settings, statistics: bool) -> float:
    """Forwards of a whole layer over the calibration samples, per layer of the pruning pass: the
    statistics' (one, or one per input site), the pruned one; --reconstruct's dense stream and
    training (a backward about twice a forward); nothing without statistics or training."""
    forwards = (4 if s.sequential else 1) if statistics else 0
    if s.reconstruct:
        forwards += 1 + 3 * s.reconstruct.epochs
    return forwards + 1 if forwards else 0


def _reconstruct_bytes(g: Geometry, s: Settings) -> int:
    """--reconstruct's training of one layer: a float32 copy of the layer (unless it computes in
    float32), the trained weights' gradients (float32) and Adam's two moments (float32, or one byte
    each with adam8bit), the masks, one optimizer step's inputs and targets, and the activations
    autograd keeps for the backward (about three times a forward's, in float32)."""
    r = s.reconstruct
    linear = g.linear_params
    copy = g.layer_params * 4 if s.compute_bytes != 4 else 0
    moments = linear * (2 if r.optimizer == "adam8bit" else 8)
    batch = r.batch_size * s.seqlen * g.hidden * 4 * 2
    step = Settings(**{**s.__dict__, "batch_size": r.batch_size, "compute_bytes": 4})
    return copy + linear * 4 + moments + linear + batch + 3 * _forward_bytes(g, step)


def _forward_bytes(g: Geometry, s: Settings) -> int:
    """One micro-batch through a layer (dense forward, pruned forward): its input and output, the
    norm's float32 copy, q/k/v and the attention output, the MLP's gate, up, act(gate) and their
    product; on a CPU the attention scores of every head. Not the statistic's own temporaries."""
    micro = s.batch_size * s.seqlen  # tokens in one micro-batch
    forward = micro * s.compute_bytes * (4 * g.hidden + 2 * (g.heads + g.kv_heads) * g.head_dim)
    forward += micro * 4 * g.hidden + micro * s.compute_bytes * 4 * g.intermediate
    if s.device == "cpu":
        forward += 2 * s.batch_size * g.heads * s.seqlen * s.seqlen * s.compute_bytes
    return forward


def _ram_by_step(g: Geometry, s: Settings, buffer: int, forward: int, statistics: int, prune_scratch: int,
                 prune_calibrated: bool, outliers: int) -> dict[str, int]:  # fmt: skip
    """RAM of each step, beside the runtime, the tokenizer and the calibration ids. In the layer
    loop: beside the next layer being read (with overlap; pinned, so rounded up to powers of two,
    on a GPU machine) and the activation buffer (or about a micro-batch of it on disk)."""
    on_cpu, tokens = s.device == "cpu", s.nsamples * s.seqlen
    stored_layer = g.layer_params * s.stored_bytes
    largest_linear = max(rows * cols for rows, cols in g.linear_shapes().values())
    masks = g.linear_params  # one byte per weight
    pruned_stored = g.linear_params * s.stored_bytes  # pruned copies of the read tensors, for the writer
    # On a CPU in the stored dtype the built layer is the read tensors, and each pruned weight
    # replaces its dense one and is itself what gets written: no masks kept, no copies for the writer.
    shares_storage = on_cpu and s.stored_bytes == s.compute_bytes
    read = stored_layer if on_cpu else _pinned_bytes(g, s.stored_bytes)
    this_layer = read + (0 if shares_storage or not on_cpu else g.layer_params * s.compute_bytes)
    cpu_forward, cpu_statistics = (forward, statistics) if on_cpu else (0, 0)
    kept_masks = 0 if shares_storage else masks
    previous_writes = stored_layer if s.overlap else 0  # the last layer's tensors, until its writes are waited for
    micro_buffer = s.batch_size * s.seqlen * g.hidden * s.compute_bytes * 2  # what an offloaded buffer keeps resident
    resident_buffer = 0 if not buffer else buffer if s.offload == "cpu" else micro_buffer
    beside_stream = (read if s.overlap else 0) + resident_buffer  # while a pass streams activations
    # the pruning pass keeps the buffer only if its method streams activations
    beside = (read if s.overlap else 0) + (resident_buffer if prune_calibrated else 0)
    ram = {COPY_OUTSIDE: g.vocab * g.hidden * s.stored_bytes}  # the largest tensor outside the layers
    if buffer:
        ram[EMBED] = _embedding_ram(g, s, tokens, buffer)
    if outliers:
        ram[OUTLIER_PASS] = beside_stream + this_layer + (outliers if on_cpu else 0)
    if statistics:  # the statistics' forward: only a method that has statistics takes it
        ram[DENSE_FORWARD] = beside + this_layer + cpu_forward + cpu_statistics + previous_writes
    # on a CPU the run waits for those writes before it prunes (pipeline.prune_weights)
    prune = beside + this_layer + kept_masks + (0 if on_cpu else previous_writes) + cpu_statistics
    ram[PRUNE] = prune + (prune_scratch + largest_linear * s.compute_bytes if on_cpu else 0)
    # the pruned tensors handed to the writer, and the pruned forward
    ram[WRITE_AND_PROPAGATE] = beside + this_layer + kept_masks + cpu_forward + (0 if shares_storage else pruned_stored)
    return ram


def _embedding_ram(g: Geometry, s: Settings, tokens: int, buffer: int) -> int:
    """RAM while embedding the calibration tokens: a slice of the embedding's rows (and its
    compute-dtype copy), the gathered rows of a run of tokens, and the buffer (or, on disk, the
    pages the run touches: up to two per token)."""
    slice_rows = min(g.vocab, max(1, EMBEDDING_SLICE_BYTES // (g.hidden * s.stored_bytes)))
    table = slice_rows * g.hidden * (s.stored_bytes + (s.compute_bytes if s.compute_bytes != s.stored_bytes else 0))
    run_tokens = min(tokens, max(1, EMBEDDING_SLICE_BYTES // (g.hidden * s.compute_bytes)))
    if s.offload == "disk":
        run_tokens = min(run_tokens, OFFLOADED_TOKENS_PER_COPY)
    gathered = run_tokens * g.hidden * s.compute_bytes
    return table + gathered + (buffer if s.offload == "cpu" else run_tokens * 2 * 4096)


def current_rss_bytes() -> int:
    """This process's resident set now (Linux /proc; 0 where unknown)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def default_limits(runtime_bytes: int, device: torch.device | None) -> tuple[int | None, int | None]:
    """The limits a run on this machine has unless told otherwise: RAM, what is resident now plus what
    is available; GPU memory, what is free on `device` (None on a CPU or where unknown)."""
    available = available_ram_bytes()
    max_ram = None if available is None else runtime_bytes + available
    max_vram = torch.cuda.mem_get_info(device)[0] if device is not None and device.type == "cuda" else None
    return max_ram, max_vram


def shared(geometry: Geometry, settings: Settings, processes: int, max_ram: int | None, max_vram: int | None
           ) -> tuple[dict, list[str]]:  # fmt: skip
    """The plan of each of `processes` processes on one machine sharing the calibration samples
    (torchrun, distributed.py), from the one-process `settings`: each holds its share of the
    buffer and computes its share of the forwards and statistics, so memory and those FLOPs are a
    share's (the machine's RAM is split between them); the leader alone prunes, and writes the
    output and the whole buffer at each resume point, so those terms are the whole run's."""
    whole = estimate(geometry, settings)
    share = replace(settings, nsamples=math.ceil(settings.nsamples / processes),
                    checkpoint_every=whole["checkpoint_every"])  # fmt: skip
    plan, problems = fit(geometry, share, None if max_ram is None else max_ram // processes, max_vram)
    settings.offload, settings.expert_weights = share.offload, share.expert_weights
    for key in ("bytes_written", "disk_bytes"):  # the whole buffer's (what pruning costs does not depend on it)
        plan[key] = whole[key]
    plan.update(processes=processes, machine_peak_ram_bytes=processes * plan["peak_ram_bytes"])
    return plan, problems


def fit(geometry: Geometry, settings: Settings, max_ram: int | None, max_vram: int | None) -> tuple[dict, list[str]]:
    """The plan, and what does not fit the limits, each with the flag that would make it fit
    (empty when everything fits). `settings.offload` "auto" becomes "cpu" or "disk" here."""

    def plan_of(**changes) -> dict:
        return estimate(geometry, replace(settings, **changes))

    def ram_ok(plan: dict) -> bool:
        return max_ram is None or plan["peak_ram_bytes"] <= max_ram

    def vram_ok(plan: dict) -> bool:
        return max_vram is None or plan["peak_vram_bytes"] is None or plan["peak_vram_bytes"] <= max_vram

    if settings.expert_weights == "auto":  # first: experts in RAM make the RAM that --offload auto weighs
        on_gpu = settings.device != "cuda" or not geometry.experts or vram_ok(plan_of(expert_weights="gpu"))
        settings.expert_weights = "gpu" if on_gpu else "cpu"
    if settings.offload == "auto":
        settings.offload = "cpu" if ram_ok(plan_of(offload="cpu")) else "disk"
    plan, problems = estimate(geometry, settings), []
    if not ram_ok(plan):
        need = (
            f"needs about {format_size(plan['peak_ram_bytes'])} of RAM, more than the {format_size(max_ram)} available"
        )
        if settings.offload == "cpu" and ram_ok(plan_of(offload="disk")):
            problems.append(f"{need}: add --offload disk to keep the activation buffer in a file")
        else:
            fits = [
                n
                for n in (64, 32, 16, 8, 4, 2, 1)
                if n < settings.nsamples and ram_ok(plan_of(nsamples=n, offload="disk"))
            ]
            hint = f"lower --nsamples (e.g. {fits[0]}) with --offload disk" if fits else "use a machine with more RAM"
            problems.append(f"{need} even with --offload disk: {hint}, or raise --max-ram if you know better")
    if not vram_ok(plan):
        need = f"needs about {format_size(plan['peak_vram_bytes'])} of GPU memory, more than {format_size(max_vram)}"
        batches = [b for b in range(settings.batch_size - 1, 0, -1) if vram_ok(plan_of(batch_size=b))]
        if geometry.experts and settings.expert_weights == "gpu" and vram_ok(plan_of(expert_weights="cpu")):
            problems.append(f"{need}: add --expert-weights cpu (each expert visits the GPU only while it computes)")
        elif batches:
            problems.append(f"{need}: lower --batch-size to {batches[0]}")
        elif settings.compute_bytes == 4 and vram_ok(plan_of(compute_bytes=2, batch_size=1)):
            problems.append(f"{need}: compute in --dtype bfloat16")
        else:
            problems.append(f"{need}: lower --seqlen, or use --device cpu")
    return plan, problems


def largest_batch(geometry: Geometry, settings: Settings, max_vram: int | None, most: int = 16) -> int:
    """--batch-size auto: the most calibration samples per micro-batch whose peak fits max_vram."""
    if max_vram is None or settings.device != "cuda":
        return 1
    for batch in range(min(most, settings.nsamples), 1, -1):
        if estimate(geometry, replace(settings, batch_size=batch))["peak_vram_bytes"] <= max_vram:
            return batch
    return 1
