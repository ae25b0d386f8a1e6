"""What a run will need, from config.json alone: peak RAM and VRAM, disk, bytes moved, FLOPs, time.

`estimate()` is pure arithmetic over the model's geometry and the run's settings. Its RAM is
estimated per step of the run, under the step names below, which pipeline.PruneRun's step methods
carry too: the run records the steps it took (and the resident size after each) under the same
names, a test checks that the two sets agree, and benchmarks/memory.py compares them by measurement.
What a method holds (its statistics, its scratch) the method reports itself (methods/base.py).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .buffers import EMBEDDING_SLICE_BYTES, OFFLOADED_TOKENS_PER_COPY, available_ram_bytes
from .config import keep_block
from .methods import Target, method_named
from .methods.wanda import InputSqNorm
from .sizes import format_size

# The steps of a run whose memory is estimated, as pipeline.PruneRun names them.
COPY_OUTSIDE = "copy outside tensors"
EMBED = "embed calibration tokens"
OUTLIER_PASS = "outlier pass"  # --allocation owl only
DENSE_FORWARD = "dense forward"
PRUNE = "prune"
RECONSTRUCT = "reconstruct"  # --reconstruct only
WRITE_AND_PROPAGATE = "write and propagate"

# Dense bf16 tensor-core peaks (vendor datasheets, TFLOP/s); a run reaches a fraction of this.
GPU_PEAK_TFLOPS = {"h200": 989, "h100": 989, "a100": 312, "l40s": 362, "rtx4090": 165, "rtx3090": 71, "a10": 125}
GPU_EFFICIENCY = 0.4  # fraction of peak that batch-1 layer forwards typically reach
# float32 without tensor cores (statistics such as SparseGPT's Hessians, and its solve), data sheets;
# an H200 multiplied 8192-square float32 matrices at 52 of its 67
GPU_FLOAT32_TFLOPS = {"h200": 67, "h100": 67, "a100": 19.5, "l40s": 91.6, "rtx4090": 82.6, "rtx3090": 35.6, "a10": 31.2}
GPU_FLOAT32_EFFICIENCY = 0.75
GPU_MEMORY_GB = {"h200": 141, "h100": 80, "a100": 80, "l40s": 48, "rtx4090": 24, "rtx3090": 24, "a10": 24}
TOKENIZER_BYTES_PER_VOCAB_ENTRY = 1024  # a loaded fast tokenizer, measured: ~48 MB for 49k entries


@dataclass(frozen=True)
class Geometry:
    """The sizes that decide memory and work, from a Llama-family config.json."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    fused: bool = False  # Phi-3: q/k/v one Linear, gate/up another (a larger largest Linear)
    copied_params: int = 0  # a vision-language checkpoint's vision tower and projector, copied as they are
    # mixture of experts: `experts` MLPs of width `intermediate` a block, `experts_per_token` of them
    # run for each token, beside a shared MLP of width `shared_intermediate` (Qwen2-MoE) run for all
    experts: int = 0
    experts_per_token: int = 0
    shared_intermediate: int = 0

    @classmethod
    def from_config(cls, config: dict) -> Geometry:
        from .families import FAMILIES, num_experts, text_config

        copied = 0
        if "text_config" in config:  # a vision-language checkpoint: its language model's (the rest is copied)
            copied = vision_params(config)
            config = text_config(config)
        heads = config["num_attention_heads"]
        moe = getattr(FAMILIES.get(config.get("model_type")), "experts", None)
        experts = num_experts(config) if moe else 0
        return cls(
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            intermediate=config[moe.width] if moe else config["intermediate_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=config.get("model_type") in ("qwen2", "qwen2_moe") or bool(config.get("attention_bias", False)),
            fused=config.get("model_type") == "phi3",
            copied_params=copied,
            experts=experts,
            experts_per_token=config.get("num_experts_per_tok") or 0 if experts else 0,
            shared_intermediate=config.get("shared_expert_intermediate_size") or 0 if experts else 0,
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of the pruned Linears (seven, Phi-3's four, or a MoE block's attention, shared
        MLP and every expert's three)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        if self.fused:
            return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i)}
        attention = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q)}
        if not self.experts:
            return {**attention, "gate": (i, h), "up": (i, h), "down": (h, i)}
        shared = self.shared_intermediate
        mlps = {**({"shared gate": (shared, h), "shared up": (shared, h), "shared down": (h, shared)} if shared else {})}
        for e in range(self.experts):
            mlps.update({f"expert {e} gate": (i, h), f"expert {e} up": (i, h), f"expert {e} down": (h, i)})
        return {**attention, **mlps}

    def site_widths(self) -> dict[str, int]:
        """in_features of each input site (families.Projections)."""
        q = self.heads * self.head_dim
        widths = {"attention input": self.hidden, "o_proj input": q}
        if not self.experts or self.shared_intermediate:
            widths.update({"mlp input": self.hidden, "down_proj input": self.shared_intermediate or self.intermediate})
        for e in range(self.experts):
            widths.update({f"expert {e} input": self.hidden, f"expert {e} down_proj input": self.intermediate})
        return widths

    @property
    def linear_params(self) -> int:
        return sum(rows * cols for rows, cols in self.linear_shapes().values())

    @property
    def active_linear_params(self) -> int:
        """The pruned Linears' weights one token computes with: all of them, or in a MoE block those
        of its experts_per_token experts (the forward's work)."""
        if not self.experts:
            return self.linear_params
        idle = (self.experts - self.experts_per_token) * 3 * self.hidden * self.intermediate
        return self.linear_params - idle

    @property
    def layer_params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        routers = self.experts * self.hidden + (self.hidden if self.shared_intermediate else 0)  # + the shared gate
        return self.linear_params + bias + routers + 2 * self.hidden  # + the two RMSNorm weights

    @property
    def outside_params(self) -> int:
        """Embedding, final norm, (untied) lm_head, and what a vision-language checkpoint copies."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden + self.copied_params


def vision_params(config: dict) -> int:
    """Parameters of Gemma 3's SigLIP vision tower and projector (the vision tower streamprune
    copies), from config.json's vision_config completed with its class's defaults."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.get("vision_config", {}).items() if k != "model_type"}
    vision = AutoConfig.for_model("siglip_vision_model", **fields)
    h, i, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # q, k, v, o; fc1, fc2; two LayerNorms
    embeddings = vision.num_channels * patch * patch * h + h + (vision.image_size // patch) ** 2 * h
    head = 0
    if getattr(vision, "vision_use_head", True):  # attention pooling: probe, attention, LayerNorm, MLP
        head = h + 3 * (h * h + h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h)
    text_hidden = config["text_config"].get("hidden_size", 2304)  # Gemma3TextConfig's default
    projector = h * text_hidden + h  # mm_input_projection_weight, mm_soft_emb_norm
    return vision.num_hidden_layers * layer + embeddings + 2 * h + head + projector  # + post_layernorm


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


def seconds(plan: dict, rates: dict, read_bytes_per_second: float, write_bytes_per_second: float, overlap: bool) -> dict:
    """Compute and I/O time; with overlap the run takes about the larger, without it the sum (pass
    overlap=False for a CPU run: its reads and writes share the cores that compute, and three
    70B-geometry layers in bfloat16 took 121 s with overlap, 122 s without).
    `rates` (probe_rates): FLOP/s of the layer forwards and of float32 matmuls, pruned weights
    through their passes per second, SparseGPT's column steps per second."""
    compute = (plan["forward_flops"] / rates["forward"] + (plan["statistic_flops"] + plan["prune_flops"]) / rates["solve"]
               + plan["pruned_weights"] / rates["weights"] + plan["prune_steps"] / rates["steps"])  # fmt: skip
    io = plan["bytes_read"] / read_bytes_per_second + plan["bytes_written"] / write_bytes_per_second
    return {"compute": compute, "io": io, "total": max(compute, io) if overlap else compute + io}


PROBE_WRITE_BYTES = 256 * 2**20  # fsynced: a smaller file can land in the disk's own cache


def disk_write_bytes_per_second(directory: Path) -> float | None:
    """Bytes per second written and fsynced to a file in `directory` (deleted after), as the writer
    does its shards; None where the directory cannot be written. This machine's disk: 0.35 GB/s,
    where 1 GB/s had been assumed."""
    chunk = bytes(8 * 2**20)
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".streamprune-probe-") as file:
            started = time.perf_counter()
            for _ in range(PROBE_WRITE_BYTES // len(chunk)):
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
            return PROBE_WRITE_BYTES / (time.perf_counter() - started)
    except OSError:
        return None


def probe_directory(model: str) -> Path:
    """Where to probe the disk: the current directory (outputs usually go below it), unless that is
    inside the source checkpoint, which is never written, even for a moment: then the temp directory."""
    here, source = Path.cwd().resolve(), Path(model).resolve()
    inside = source.is_dir() and (here == source or source in here.parents)
    return Path(tempfile.gettempdir()) if inside else here


PROBE_TOKENS = 128  # a probe forward: long enough for full-size matmuls, short enough for 70B on a CPU
# on a GPU a forward of 128 tokens is bound by its latency, not its arithmetic: with it the plan said
# 8.7 s for a 70B layer's Wanda on an H200 that took 5.4 s, so there the probe forwards the run's shape
GPU_PROBE_TOKENS = 8192


def probe_shape(device: torch.device, forward_shape: tuple[int, int] | None) -> tuple[int, int]:
    """[samples, tokens] of the probe's forward: PROBE_TOKENS on a CPU (a 70B layer's forward of a
    run's 2048 tokens takes minutes there); on a GPU the run's micro-batch `forward_shape`
    ([batch_size, seqlen]), at most GPU_PROBE_TOKENS tokens in all."""
    if device.type == "cpu" or forward_shape is None:
        return 1, PROBE_TOKENS
    batch, seqlen = forward_shape
    seqlen = min(seqlen, GPU_PROBE_TOKENS)
    return max(1, min(batch, GPU_PROBE_TOKENS // seqlen)), seqlen


def probe_rates(config: dict, compute: torch.dtype, device: torch.device,
                forward_shape: tuple[int, int] | None = None) -> dict:  # fmt: skip
    """What the run computes, timed here (best of two after a warm-up): one decoder layer of this
    geometry in the compute dtype on the device, forwarding probe_shape's tokens (attention, norms and
    rotary included; its weights one constant but a MoE router's, see probe_tensors); a
    float32 matmul (statistics such as SparseGPT's Hessians, and its solve); the passes over every
    pruned weight (weights_per_second); SparseGPT's column steps (steps_per_second). A
    square-matmul probe alone had planned 11 s for three 70B-geometry layers in bfloat16 that took
    149 s on a CPU; without the weight passes, 151 s for 236-254 s."""
    from .families import LayerRunner, family_of

    g = Geometry.from_config(config)
    runner = LayerRunner(config, family_of(config), device, compute)
    tensors = probe_tensors(runner, compute)
    samples, tokens = probe_shape(device, forward_shape)
    hidden = torch.randn(samples, tokens, g.hidden, dtype=compute, device=device)
    with torch.no_grad():
        layer = runner.build(0, tensors)
        forward = _best_seconds(lambda: runner.forward(layer, 0, hidden), device)
    del layer, tensors
    flops = samples * (2 * g.active_linear_params * tokens + 2 * g.heads * g.head_dim * tokens**2)
    rows, cols = max(g.linear_shapes().values(), key=lambda shape: shape[0] * shape[1])
    # float32 matmuls run at their own rate: on an H200 about 52 TFLOP/s, not the bfloat16 forward's
    # 700 (taken for it, the plan said 10 s for a 70B layer's SparseGPT that took 27)
    solve = measure_matmul_flops(torch.float32, device)
    return {"forward": flops / forward, "solve": solve, "weights": weights_per_second(rows, cols, compute, device),
            "steps": steps_per_second(device)}  # fmt: skip


def probe_tensors(runner, compute: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer 0's tensors for the probe: one constant value each, as a matmul's speed does not depend
    on it; but a MoE router's random, as a constant one sends every token to the same top-k experts
    and the probe would run only those (the likely reason an H200's Mixtral layer was planned at a
    third of its measured time; not yet re-measured there)."""
    tensors = {name: torch.full(p.shape, 0.01 if p.dim() == 2 else 1.0, dtype=compute)
               for name, p in runner.skeleton(0).state_dict().items()}  # fmt: skip
    if runner.experts is not None:
        router = f"{runner.experts.block}.gate.weight"  # [experts, hidden]
        tensors[router] = torch.randn(tensors[router].shape, generator=torch.Generator().manual_seed(0)).to(compute)
    return tensors


PROBE_WEIGHTS = 1 << 28  # at most this much of the largest Linear (all of a 70B's): smaller slices ran faster


def weights_per_second(rows: int, cols: int, compute: torch.dtype, device: torch.device) -> float:
    """Pruned weights per second through the run's passes over each of them, on the largest Linear
    ([rows, cols], or as many of its rows as PROBE_WEIGHTS holds: slices of 1/4 and 1/32 of a 70B
    down_proj ran 1.3x and 1.5x faster than the whole) in the compute dtype: the finite check, a
    score (Wanda's), the row mask (and its copy to the CPU), the mask applied, the zeros counted,
    timed once after a warm-up on a few rows. On this CPU in bfloat16 they are three quarters of a
    70B-geometry layer's time."""
    from .methods.masks import apply_mask, row_prune_mask, zero_count
    from .methods.wanda import wanda_scores
    from .stream import nonfinite_counts

    weight = torch.randn(min(rows, max(1, PROBE_WEIGHTS // cols)), cols, device=device).to(compute)
    sq_norm = torch.rand(cols, device=device)

    def passes(weight):
        nonfinite_counts(weight)
        mask = row_prune_mask(wanda_scores(weight, sq_norm), 0.5)
        mask.cpu()  # on a GPU the run brings each mask to the CPU (an H200's prune step: 0.7 s, its passes 0.1)
        return zero_count(apply_mask(weight, mask))

    passes(weight[:8])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    passes(weight)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return weight.numel() / (time.perf_counter() - started)


def steps_per_second(device: torch.device, columns: int = 256) -> float:
    """SparseGPT's column steps per second where each is small: their overhead, not their FLOPs."""
    from .methods.base import Target
    from .methods.sparsegpt import obs_prune

    weight = torch.randn(64, columns, device=device)
    hinv = torch.eye(columns, device=device)
    seconds = _best_seconds(lambda: obs_prune(weight.clone(), hinv, Target(sparsity=0.5), 128), device)
    return columns / seconds


def _best_seconds(work, device: torch.device, repeats: int = 2) -> float:
    work()  # warm-up
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def measure_matmul_flops(dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
                         repeats: int = 5) -> float:  # fmt: skip
    """The device's square-matmul FLOP/s in `dtype` (best of `repeats`; a CPU with torch's threads).
    A GPU multiplies 8192 x 8192 (a smaller product leaves it bound by latency), a CPU 1024 x 1024."""
    size = 1024 if device.type == "cpu" else 8192
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    return 2 * size**3 / _best_seconds(lambda: torch.mm(a, b), device, repeats)


def gpu_flops(name: str) -> float | None:
    """Assumed FLOP/s of a GPU named like one in GPU_PEAK_TFLOPS ("NVIDIA H100 80GB HBM3" -> h100)."""
    key = name.lower().replace(" ", "").replace("-", "")
    for known, tflops in GPU_PEAK_TFLOPS.items():
        if known in key:
            return tflops * 1e12 * GPU_EFFICIENCY
    return None


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
    from dataclasses import replace

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
    from dataclasses import replace

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
    from dataclasses import replace

    if max_vram is None or settings.device != "cuda":
        return 1
    for batch in range(min(most, settings.nsamples), 1, -1):
        if estimate(geometry, replace(settings, batch_size=batch))["peak_vram_bytes"] <= max_vram:
            return batch
    return 1


def report(plan: dict, settings: Settings, times: dict | None, device_name: str, problems: list[str]) -> str:
    """The plan as the lines a user reads before a run."""
    ram_parts = ", ".join(f"{name} {format_size(n)}" for name, n in plan["peak_ram_parts"].items() if n)
    lines = [
        f"plan: {plan['params'] / 1e9:.2f} B parameters, {format_size(plan['checkpoint_bytes'])} checkpoint, "
        f"one layer {format_size(plan['layer_bytes'])}, activation buffer {format_size(plan['buffer_bytes'])} "
        f"(offload {settings.offload})",
        f"  peak RAM   {format_size(plan['peak_ram_bytes'])} ({ram_parts})",
    ]
    experts, per_token = plan.get("experts", (0, 0))
    if experts:
        lines.insert(1, f"  experts    {experts} a block, {per_token} run per token: a layer holds {experts / per_token:.0f}x "
                        "the MLP weights a token computes with, and a statistic per expert (all counted here)")  # fmt: skip
    if plan.get("experts_in_ram"):
        lines.insert(2, "  experts    kept in RAM (--expert-weights cpu): each visits the GPU while it computes; their "
                        "statistics and pruning run on the CPU, slower than the estimate below")  # fmt: skip
    if plan["peak_vram_bytes"] is not None:
        lines.append(
            f"  peak VRAM  {format_size(plan['peak_vram_bytes'])} (allocated by torch; the CUDA context adds ~0.5 GB)"
        )
    disk = ", ".join(f"{name} {format_size(n)}" for name, n in plan["disk_bytes"].items() if n)
    lines += [
        f"  disk       {format_size(sum(plan['disk_bytes'].values()))} ({disk})",
        f"  I/O        read {format_size(plan['bytes_read'])}, write {format_size(plan['bytes_written'])}"
        + (
            f" ({plan['bytes_written'] / plan['checkpoint_bytes']:.2f}x the output: a resume point every "
            f"{plan['checkpoint_every']} layer(s), {plan['resume_points']} in all; a kill redoes at most "
            f"{plan['checkpoint_every']})"
            if plan["buffer_bytes"]
            else ""
        ),
        f"  compute    {plan['flops'] / 1e12:,.1f} TFLOP",
    ]
    if times is not None:
        overlapped = settings.overlap and settings.device == "cuda"  # as plan_model computed them
        lines.append(
            f"  time       ~{_duration(times['total'])} on {device_name} (compute {_duration(times['compute'])}, "
            f"I/O {_duration(times['io'])}, {'overlapped' if overlapped else 'in sequence'})"
        )
    if plan.get("processes", 1) > 1:
        speed_up = f"; expected speed-up {times['speed_up']:.2f}x over one process" if times else ""
        lines.append(
            f"  processes  {plan['processes']} (torchrun): memory above is each one's (its share of the samples); "
            f"the machine holds {format_size(plan['machine_peak_ram_bytes'])} of RAM{speed_up}"
        )
    lines += [f"  does not fit: {problem}" for problem in problems] or ["  fits the limits"]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_device(device: str, compute: torch.dtype, max_gpu_memory: int | None, config: dict,
                forward_shape: tuple[int, int] | None = None) -> tuple:  # fmt: skip
    """(name, rates or None, "cpu" or "cuda", GPU memory limit) for `plan --device`: auto, cpu or
    cuda[:N] (this machine's: its rates probed, see probe_rates, on the run's [batch_size, seqlen]
    `forward_shape`) or a GPU named in GPU_PEAK_TFLOPS (its rates assumed from the peak)."""
    from .errors import UsageError

    named = device.lower().replace("-", "")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if named in GPU_PEAK_TFLOPS:
        return device, assumed_rates(named), "cuda", max_gpu_memory or GPU_MEMORY_GB[named] * 10**9
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: torch sees no GPU here; name one instead, e.g. --device rtx4090")
        name = torch.cuda.get_device_name(torch.device(device))
        limit = max_gpu_memory or default_limits(0, torch.device(device))[1]
        return name, local_rates(config, compute, torch.device(device), limit, forward_shape), "cuda", limit
    if device == "cpu":
        rates = local_rates(config, compute, torch.device("cpu"), available_ram_bytes())
        return "this CPU (probed)", rates, "cpu", max_gpu_memory
    raise UsageError(f"--device {device!r}: use auto, cpu, cuda, or one of {', '.join(GPU_PEAK_TFLOPS)}")


def assumed_rates(named: str) -> dict:
    """A GPU that is not here (a key of GPU_PEAK_TFLOPS): FLOP/s assumed from its data sheet, the
    bfloat16 peak for forwards and the float32 one for statistics and solves; weight passes and
    SparseGPT's column steps at assumed rates (an H200 made 1e4 steps a second)."""
    return {"forward": gpu_flops(named), "weights": 1e10, "steps": 1e4,
            "solve": GPU_FLOAT32_TFLOPS[named] * 1e12 * GPU_FLOAT32_EFFICIENCY}  # fmt: skip


def local_rates(config: dict, compute: torch.dtype, device: torch.device, memory: int | None,
                forward_shape: tuple[int, int] | None = None) -> dict | None:  # fmt: skip
    """probe_rates where one layer in the compute dtype takes at most a quarter of `memory`;
    otherwise a square matmul's rate in the compute dtype (assumed from the data sheet on a GPU) for
    the forwards, a float32 one measured here for the solves (optimistic)."""
    layer_bytes = Geometry.from_config(config).layer_params * compute.itemsize
    if memory is not None and layer_bytes > memory / 4:
        rate = measure_matmul_flops(compute) if device.type == "cpu" else gpu_flops(torch.cuda.get_device_name(device))
        if rate is None:
            return None
        return {"forward": rate, "solve": measure_matmul_flops(torch.float32, device), "weights": 1e8, "steps": 1e4}
    return probe_rates(config, compute, device, forward_shape)


def plan_model(
    model: str,
    dtype: str = "auto",
    device: str = "auto",
    max_ram: int | None = None,
    max_gpu_memory: int | None = None,
    read_bytes_per_second: float = 2e9,
    write_bytes_per_second: float | None = None,
    processes: int = 1,
    **run_settings,
) -> tuple[str, dict]:
    """`streamprune plan`: the report and the numbers for MODEL (a directory, hub id or alias;
    only its config.json is read). `device` is auto, cpu, cuda or a GPU name from GPU_PEAK_TFLOPS;
    `run_settings` are the run's own Settings fields (method, pattern, nsamples, seqlen, ...).
    `write_bytes_per_second` None: probed (probe_directory) where the plan probes its device (1 GB/s
    assumed for a GPU named but not here)."""
    from .checkpoint import FLOAT_DTYPES as DTYPES
    from .config import check_dtype
    from .families import family_of
    from .source import fetch_config

    check_dtype(dtype)
    config, where = fetch_config(model)
    family = family_of(config)
    family.classes()  # the run's heavy imports, so that the runtime measured below is the run's
    import transformers.models.auto.tokenization_auto  # noqa: F401

    geometry = Geometry.from_config(config)
    stored = DTYPES.get(config.get("torch_dtype") or config.get("dtype") or "float32", torch.float32)
    compute = stored if dtype == "auto" else DTYPES[dtype]
    seqlen = run_settings.pop("seqlen", Settings.seqlen)
    seqlen = min(seqlen, config.get("max_position_embeddings") or seqlen)
    forward_shape = (run_settings.get("batch_size") or Settings.batch_size, seqlen)
    device_name, rates, kind, max_gpu_memory = plan_device(device, compute, max_gpu_memory, config, forward_shape)
    settings = Settings(**run_settings, seqlen=seqlen, stored_bytes=stored.itemsize, compute_bytes=compute.itemsize,
                        device=kind, runtime_bytes=current_rss_bytes())  # fmt: skip
    if max_ram is None:
        max_ram = default_limits(settings.runtime_bytes, None)[0]
    if processes > 1:
        alone = estimate(geometry, settings)
        plan, problems = shared(geometry, settings, processes, max_ram, max_gpu_memory)
    else:
        plan, problems = fit(geometry, settings, max_ram, max_gpu_memory)
    here = device.lower().replace("-", "") not in GPU_PEAK_TFLOPS  # this machine's device, probed
    probed = None
    if write_bytes_per_second is None and rates is not None and here:
        probed = disk_write_bytes_per_second(probe_directory(model))
    write_probed = probed is not None
    write_bytes_per_second = write_bytes_per_second or probed or 1e9
    times = None
    if rates is not None:
        io = read_bytes_per_second, write_bytes_per_second, settings.overlap and kind == "cuda"
        # processes on one CPU share its cores (torchrun gives each one thread): each computes at
        # its share of the probed rates; on GPUs each has its own
        times = seconds(plan, {k: r / processes for k, r in rates.items()} if kind == "cpu" else rates, *io)
        if processes > 1:
            times["speed_up"] = seconds(alone, rates, *io)["total"] / times["total"]
    head = (
        f"{model}: {config.get('architectures', ['?'])[0]}, {geometry.layers} layers, hidden {geometry.hidden}, "
        f"stored {str(stored).removeprefix('torch.')}, compute {str(compute).removeprefix('torch.')} "
        f"(config from {where})\nlimits: RAM {format_size(max_ram) if max_ram else 'unknown'}"
        + (f", GPU memory {format_size(max_gpu_memory)}" if kind == "cuda" else "")
        + f"; disk read {read_bytes_per_second / 1e9:g} GB/s (assumed), write {write_bytes_per_second / 1e9:.2g} GB/s "
        + ("(probed here)" if write_probed else "(assumed)")
    )
    text = head + "\n" + report(plan, settings, times, device_name, problems)
    numbers = {
        **plan,
        "settings": {**settings.__dict__, "reconstruct": settings.reconstruct and settings.reconstruct.as_record()},
        "limits": {"ram_bytes": max_ram, "gpu_bytes": max_gpu_memory},
        "seconds": times,
        "device": device_name,
        "fits": not problems,
        "problems": problems,
    }
    return text, numbers


# -- streamprune heal: the whole model in memory -----------------------------------------------------------

# bytes a projection weight takes as heal's frozen base: NF4 is 4 bits plus a float32 absmax per
# block of 64 (bitsandbytes' default blocks), int8 one byte plus a float32 absmax per row
BASE_BYTES_PER_WEIGHT = {"nf4": 0.5 + 4 / 64, "int8": 1.0, "bf16": 2.0, "fp32": 4.0}
HEAL_OPTIMIZER_BYTES = {"adam": 16, "adam8bit": 10}  # an adapter weight: value, gradient, two moments


def heal_memory(g: Geometry, base: str, compute_bytes: int, rank: int, batch: int, seqlen: int, optimizer: str,
                checkpointing: bool) -> dict[str, int]:  # fmt: skip
    """Peak bytes of `streamprune heal` on its device, by part."""
    tokens = batch * seqlen
    adapter_params = g.layers * sum(rank * (rows + cols) for rows, cols in g.linear_shapes().values())
    # one block's autograd state a token, in the compute dtype: the norms' inputs and scaled outputs,
    # the rotated q and k, attention's inputs and output, the MLP's gate, up, activation and product;
    # fitted to heal's measured peaks on SmolLM2 without checkpointing (README, Status), ~2x a bare count
    block_activations = tokens * (12 * g.hidden + 8 * g.intermediate + 2 * (g.heads + 2 * g.kv_heads) * g.head_dim)
    block_activations *= compute_bytes
    # a block's weights as computed, kept for backward: base dequantized plus masked delta (float32)
    # and the unpacked keep-mask (1 byte a weight)
    block_weights = g.linear_params * (4 + 1)
    return {
        "frozen base": int(g.layers * g.linear_params * BASE_BYTES_PER_WEIGHT[base]),
        "masks": g.layers * g.linear_params // 8,
        "embeddings, norms, head": (g.outside_params + g.layers * 2 * g.hidden) * compute_bytes,
        "adapters and optimizer": adapter_params * HEAL_OPTIMIZER_BYTES[optimizer],
        # with checkpointing each block keeps only its input; one block at a time is recomputed
        "activations": (g.layers * tokens * g.hidden * compute_bytes + block_activations) if checkpointing
        else g.layers * block_activations,
        "block weights": block_weights if checkpointing else g.layers * block_weights,
        "logits": 3 * tokens * g.vocab * 4,  # float32 logits, their log-softmax and its gradient
    }


def heal_flops(g: Geometry, tokens: int, checkpointing: bool) -> float:
    """One optimizer step: forward (twice with checkpointing), the input gradient through every
    Linear and the head, and each masked delta's full [out, in] gradient."""
    linears, head = 2 * tokens * g.layers * g.linear_params, 2 * tokens * g.vocab * g.hidden
    return linears * (3 + (1 if checkpointing else 0)) + 2 * head


def plan_heal(model: str, device: str = "auto", base: str = "auto", rank: int = 16, batch_size: int = 4,
              seqlen: int = 512, steps: int = 200, optimizer: str = "adam", checkpointing: bool = True,
              max_ram: int | None = None, max_gpu_memory: int | None = None) -> tuple[str, dict]:  # fmt: skip
    """`streamprune plan MODEL --heal`: whether LoRA healing fits, and how long it takes."""
    from .errors import UsageError
    from .families import family_of
    from .heal import NOT_MOE, compute_dtype, resolve_base
    from .source import fetch_config

    config, where = fetch_config(model)
    family = family_of(config)
    if family.experts is not None:
        raise UsageError(f"{model} is a mixture-of-experts model ({family.architecture}); {NOT_MOE}")
    family.classes()
    import peft  # noqa: F401  (heal's heavy imports, so that the runtime measured below is heal's)
    import transformers.models.auto.tokenization_auto  # noqa: F401

    g = Geometry.from_config(config)
    seqlen = min(seqlen, config.get("max_position_embeddings") or seqlen)
    device_name, rates, kind, max_gpu_memory = plan_device(device, torch.float32, max_gpu_memory, config)
    base = resolve_base(base, kind)
    compute_bytes = compute_dtype(base, kind).itemsize
    parts = heal_memory(g, base, compute_bytes, rank, batch_size, seqlen, optimizer, checkpointing)
    peak = sum(parts.values())
    runtime = current_rss_bytes()
    limit = max_gpu_memory if kind == "cuda" else (max_ram or default_limits(runtime, None)[0])
    needed = peak if kind == "cuda" else peak + runtime
    problems = []
    if limit is not None and needed > limit:
        problems.append(
            f"heal needs {format_size(needed)} on the {'GPU' if kind == 'cuda' else 'CPU'}, which has "
            f"{format_size(limit)}"
            + (f"; the frozen base alone is {format_size(parts['frozen base'])}" if parts["frozen base"] > limit / 2 else "")
            + ". Heal layer by layer instead, one block in memory at a time: streamprune run MODEL --reconstruct "
            "(plan it with: streamprune plan MODEL --reconstruct)"
            + ("" if base == "nf4" else ", or try --base nf4")
        )
    step_flops = heal_flops(g, batch_size * seqlen, checkpointing)
    total_seconds = steps * step_flops / rates["forward"] if rates else None
    lines = [
        f"{model}: {config.get('architectures', ['?'])[0]}, {g.layers} layers (config from {where})",
        f"heal plan: LoRA rank {rank} on {len(g.linear_shapes()) * g.layers} Linears ({format_size(parts['adapters and optimizer'])} "
        f"with {optimizer}), base {base}, {batch_size} x {seqlen} tokens a step, gradient checkpointing "
        f"{'on' if checkpointing else 'off'}",
        f"  peak {'VRAM' if kind == 'cuda' else 'RAM '} {format_size(needed)} ("
        + ", ".join(f"{name} {format_size(n)}" for name, n in parts.items())
        + (f", runtime {format_size(runtime)}" if kind == "cpu" else "") + ")",
        f"  compute    {steps * step_flops / 1e12:,.1f} TFLOP for {steps} steps"
        + (f", ~{_duration(total_seconds)} on {device_name}" if total_seconds else ""),
        *([f"  does not fit: {p}" for p in problems] or ["  fits the limits"]),
    ]
    numbers = {"parts": parts, "peak_bytes": needed, "limit_bytes": limit, "device": device_name, "base": base,
               "flops": steps * step_flops, "seconds": total_seconds, "fits": not problems, "problems": problems}  # fmt: skip
    return "\n".join(lines), numbers
