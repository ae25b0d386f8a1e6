"""The settings of one pruning run, grouped as the CLI's help panels group their flags (method,
calibration, reconstruction, resources, output), frozen, and checked once, before anything is read or
written. What a run decides for itself (an auto batch size, where the buffer lives) is not written
back here: the run's setup returns it (pipeline/setup.py)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path

import torch

from .allocation import ALLOCATIONS, OWL_LAMBDA, OWL_M, check_owl
from .checkpoint import FLOAT_DTYPES as DTYPES
from .errors import UsageError
from .methods import METHODS, Method, Target, method_named
from .reconstruct import OPTIMIZERS, ReconstructSettings
from .sizes import parse_size

PROPAGATE = ("pruned", "dense")
OFFLOAD = ("auto", "cpu", "disk")
EXPERT_WEIGHTS = ("auto", "gpu", "cpu")


@dataclass(frozen=True)
class MethodArgs:
    """What is pruned, and how much."""

    method: str = "wanda"
    sparsity: float | None = None  # fraction zeroed in every pruned Linear; 0.5 when no pattern
    pattern: str | None = None  # "N:M": keep N of every M consecutive inputs in each row
    percdamp: float | None = None  # sparsegpt: dampening, a fraction of H's mean diagonal; None: 0.01
    blocksize: int | None = None  # sparsegpt: columns pruned together; None: 128
    allocation: str = "uniform"  # every layer loses `sparsity`, or owl: per layer, by its outliers
    owl_m: float = OWL_M  # owl: an outlier scores above this many times its layer's mean
    owl_lambda: float = OWL_LAMBDA  # owl: layer sparsities span at most 2 x this
    sequential: bool = False  # each input site's statistics from the layer with the Linears before it pruned

    def __post_init__(self):
        check_choice("--method", self.method, METHODS)
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity, self.pattern))
        self.build()  # its options and the target checked now
        if self.sequential and METHODS[self.method].statistic is None:
            raise UsageError(
                f"--sequential orders the statistics of a layer's input sites; --method {self.method} has none: drop it"
            )
        check_choice("--allocation", self.allocation, ALLOCATIONS)
        if self.allocation == "owl":
            check_owl(self.sparsity, self.pattern, self.owl_m, self.owl_lambda)

    def options(self) -> dict:
        return {"percdamp": self.percdamp, "blocksize": self.blocksize}

    def build(self) -> Method:
        method = method_named(self.method, **self.options())
        method.check_target(self.target)
        return method

    def keep_block(self) -> tuple[int, int] | None:
        """(keep_n, block_m) of --pattern, or None for unstructured sparsity."""
        return keep_block(self.pattern)

    @property
    def target(self) -> Target:
        """What every pruned Linear loses (with --allocation owl, the mean over layers)."""
        return Target(sparsity=self.sparsity, keep_block=self.keep_block())

    @property
    def target_sparsity(self) -> float:
        block = self.keep_block()
        return (block[1] - block[0]) / block[1] if block else self.sparsity

    def allocation_settings(self) -> dict | None:
        """The allocation's settings for the run identity and record; None for uniform."""
        return {"name": "owl", "m": self.owl_m, "lambda": self.owl_lambda} if self.allocation == "owl" else None


@dataclass(frozen=True)
class CalibrationArgs:
    """The token windows pushed through the layers, and how they travel."""

    calib: str = "c4"  # "c4" or a .txt / .jsonl / .jsonl.gz path
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int | None = 1  # samples per micro-batch; 1 is what the reference does; None: the plan's
    propagate: str = "pruned"  # next block's inputs from the pruned block, or from the dense one

    def __post_init__(self):
        check_positive(self, "nsamples", "seqlen", "batch_size")
        check_seed(self.seed)
        check_choice("--propagate", self.propagate, PROPAGATE)


@dataclass(frozen=True)
class ReconstructionArgs:
    """--reconstruct: each pruned layer's survivors trained toward the dense layer's outputs."""

    enabled: bool = False
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 1
    norms: bool = False  # also train the norms' weights
    optimizer: str = "adam"  # or adam8bit (bitsandbytes)

    def __post_init__(self):
        for name in ("epochs", "lr", "batch_size"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"--reconstruct-{name.replace('_', '-')} must be positive, got {value}")
        check_choice("--reconstruct-optimizer", self.optimizer, OPTIMIZERS)

    def settings(self) -> ReconstructSettings | None:
        """The training's settings, or None without --reconstruct."""
        if not self.enabled:
            return None
        return ReconstructSettings(self.epochs, self.lr, self.batch_size, self.norms, self.optimizer)


@dataclass(frozen=True)
class ResourceArgs:
    """Where the run computes and keeps its buffer, and the memory it may use."""

    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # compute dtype; auto: the checkpoint's
    offload: str = "auto"  # the activation buffer in RAM (cpu), in a file (disk), or cpu when it fits (auto)
    offload_dir: str | None = None  # where --offload disk puts it; default OUT/.streamprune/offload
    # a mixture-of-experts layer's routed experts on a GPU run: on the GPU, in RAM (each visiting the
    # GPU while it computes), or on the GPU when the plan says the layer fits (auto)
    expert_weights: str = "auto"
    max_ram: str | None = None  # RAM the run may use; default what is available now
    max_gpu_memory: str | None = None  # GPU memory the run may use; default what is free on the device
    overlap: bool = True  # read, compute and write on separate threads

    def __post_init__(self):
        check_dtype(self.dtype)
        check_choice("--offload", self.offload, OFFLOAD)
        if self.offload_dir is not None and self.offload == "cpu":
            raise UsageError("--offload-dir is where --offload disk keeps the buffer; drop it, or use --offload disk")
        check_choice("--expert-weights", self.expert_weights, EXPERT_WEIGHTS)
        # parsed now so that a bad value stops the run before anything is read
        for name in ("max_ram_bytes", "max_gpu_bytes", "torch_device"):
            getattr(self, name)

    @cached_property
    def max_ram_bytes(self) -> int | None:
        return parse_limit("--max-ram", self.max_ram)

    @cached_property
    def max_gpu_bytes(self) -> int | None:
        return parse_limit("--max-gpu-memory", self.max_gpu_memory)

    @cached_property
    def torch_device(self) -> torch.device:
        return parse_device(self.device)


@dataclass(frozen=True)
class OutputArgs:
    """The output checkpoint and its resume points."""

    out: Path
    max_shard_size: str = "5GB"
    checkpoint_every: int | None = None  # a resume point (activations + state) every this many layers; None: the plan's
    checkpoint_minutes: float | None = None  # ... and also when this many minutes have passed
    force: bool = False
    quiet: bool = False

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        check_positive(self, "checkpoint_every", "checkpoint_minutes")
        self.max_shard_bytes  # noqa: B018  (parsed now, like every value)

    @cached_property
    def max_shard_bytes(self) -> int:
        return parse_shard_size(self.max_shard_size)


# each group's flags: its field names, but for reconstruction's, which carry the --reconstruct- prefix
GROUPS = {"method": MethodArgs, "calibration": CalibrationArgs, "reconstruction": ReconstructionArgs,
          "resources": ResourceArgs, "output": OutputArgs}  # fmt: skip


def flag_name(group: str, field: str) -> str:
    """The keyword (the CLI flag, underscored) of a group's field."""
    if group != "reconstruction":
        return field
    return "reconstruct" if field == "enabled" else f"reconstruct_{field}"


@dataclass(frozen=True)
class PruneConfig:
    """One run's settings. Build it from flat keywords, the CLI's flag names, with `from_flags`."""

    model: str  # local directory, hub id or alias
    method: MethodArgs
    calibration: CalibrationArgs
    reconstruction: ReconstructionArgs
    resources: ResourceArgs
    output: OutputArgs

    def __post_init__(self):
        if self.reconstruction.enabled and self.calibration.propagate == "dense":
            raise UsageError(
                "--reconstruct trains each pruned layer on the pruned stream's inputs, which --propagate dense "
                "replaces by the dense stream's; drop one of them"
            )
        if self.reconstruction.enabled and self.resources.expert_weights == "cpu":
            raise UsageError(
                "--reconstruct trains the whole layer on the compute device; --expert-weights cpu keeps the experts "
                "off it. Drop one of them"
            )

    @classmethod
    def from_flags(cls, model: str, out: Path | str, **flags) -> PruneConfig:
        """PruneConfig.from_flags("smollm2-135m", "out", sparsity=0.5, nsamples=32, reconstruct=True)."""
        groups = {}
        for group, args in GROUPS.items():
            names = {flag_name(group, f.name): f.name for f in fields(args)}
            given = {names[flag]: flags.pop(flag) for flag in list(flags) if flag in names}
            groups[group] = args(out=out, **given) if group == "output" else args(**given)
        if flags:
            raise TypeError(f"PruneConfig.from_flags: unknown settings {', '.join(sorted(flags))}")
        return cls(model=model, **groups)

    def as_record(self) -> dict:
        """The settings by their flag names (the run record's "arguments")."""
        record = {"model": self.model}
        for group in GROUPS:
            for name, value in asdict(getattr(self, group)).items():
                record[flag_name(group, name)] = str(value) if isinstance(value, Path) else value
        return record


def check_sparsity(sparsity: float | None, pattern: str | None) -> float | None:
    """--sparsity and --pattern, checked; returns the sparsity (0.5 when neither is given, None with a pattern)."""
    if pattern is not None:
        if sparsity is not None:
            raise UsageError("give either --sparsity or --pattern, not both (N:M fixes the sparsity at (M-N)/M)")
        keep_block(pattern)  # validates
        return None
    if sparsity is None:
        return 0.5
    if not 0 < sparsity < 1:
        raise UsageError(
            f"--sparsity {sparsity} is outside (0, 1): it is the fraction of weights zeroed in each Linear, "
            "e.g. --sparsity 0.5"
        )
    return sparsity


def keep_block(pattern: str | None) -> tuple[int, int] | None:
    """(keep_n, block_m) of --pattern "N:M", or None for unstructured sparsity."""
    if pattern is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match:
        raise UsageError(f"--pattern {pattern!r} is not N:M; write it like 2:4 (keep 2 of every 4)")
    keep_n, block_m = int(match[1]), int(match[2])
    if not 0 < keep_n < block_m:
        raise UsageError(
            f"--pattern {pattern}: N must be at least 1 and less than M (N is how many of every M "
            "weights are kept), e.g. 2:4 or 4:8"
        )
    return keep_n, block_m


def parse_device(text: str) -> torch.device:
    """--device: auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise UsageError(f"--device {text!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text!r}: only cpu and cuda are supported")
    return device


def parse_shard_size(text: str) -> int:
    """--max-shard-size in bytes, e.g. 5GB; the error names the flag."""
    return parse_limit("--max-shard-size", text)


def parse_limit(flag: str, text: str | None) -> int | None:
    """A memory limit such as 24GB in bytes (None stays None); the error names the flag."""
    if text is None:
        return None
    try:
        return parse_size(text)
    except UsageError as err:
        raise UsageError(f"{flag}: {err}") from None


def check_dtype(dtype: str) -> None:
    check_choice("--dtype", dtype, ("auto", *DTYPES))


def check_choice(flag: str, value: str, choices) -> None:
    if value not in choices:
        raise UsageError(f"{flag} {value!r} is not one of: {', '.join(choices)}")


def check_positive(settings, *names: str) -> None:
    """Each named field of `settings` a positive finite number or None; the error names the flag (NaN
    compares false with everything, so `value <= 0` alone would let it through)."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_eval_text(path: Path | str | None, seqlen: int, ppl_flag: str, seqlen_flag: str) -> None:
    """A perplexity evaluation asked beside another command (run's, heal's --eval-ppl), checked before
    that command's work: the file holds text, and a window scores at least one token given another."""
    if path is None:
        return
    if str(path) == "wikitext2":  # the standard text, found when the evaluation runs (data.ppl_text)
        check_window(seqlen, seqlen_flag)
        return
    if not Path(path).is_file():
        raise UsageError(f"{ppl_flag} {path}: no such file; pass a text file such as wiki.test.raw")
    with open(path, "rb") as text:
        while block := text.read(1 << 20):
            if block.strip():
                break
        else:
            raise UsageError(f"{ppl_flag} {path} holds no text; pass a text file such as wiki.test.raw")
    check_window(seqlen, seqlen_flag)


def check_window(seqlen: int, seqlen_flag: str) -> None:
    """A perplexity window scores each token given those before it: at least 2 tokens."""
    if seqlen < 2:
        raise UsageError(f"{seqlen_flag} {seqlen}: a window scores each token given those before it, so it needs "
                         f"at least 2 tokens; e.g. {seqlen_flag} 2048")  # fmt: skip


def check_seed(seed: int) -> None:
    """A seed is a non-negative integer: Python's generator would take -1 as 1, silently."""
    if seed < 0:
        raise UsageError(f"--seed {seed} is negative; a seed is 0 or more, e.g. --seed 0")
