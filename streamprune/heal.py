"""Global LoRA healing of a pruned model (QLoRA when the base is NF4): `streamprune heal`.

Unlike run, eval and depth, this trains the whole model at once: the frozen base is held in memory
(NF4 or int8 through bitsandbytes, or bf16/fp32), LoRA adapters (peft) on the seven projection
Linears of every block train on a causal language-modelling loss, and the result is merged into
the source's own weights and written as an ordinary checkpoint. `streamprune plan MODEL --heal`
says whether that fits; where it cannot (70B on 24 GB), block reconstruction (`run --reconstruct`,
one block in memory at a time) is the way.

Sparsity is kept exactly: peft's LoRA adds a dense delta B A, which merged would fill every pruned
weight. Each adapter's delta is therefore applied through its Linear's keep-mask (the source's
nonzeros, one bit a weight) in training as in the merge, so the model trained is the model written
and every zero of the source is +0.0 in the output.

Resumable like run: every --checkpoint-every steps the adapters, the optimizer and the step are
saved in --out; the same command goes on from there, bit for bit on a CPU.
"""

from __future__ import annotations

import io
import logging
import math
import re
import resource
import shutil
import sys
import time
import types
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import buffers
from .calibration import DataFlags, calibration_path, file_sha256, sample_calibration
from .config import check_choice, check_eval_text, check_positive, check_seed, parse_device, parse_shard_size
from .errors import UsageError
from .families import TEXT_ONLY
from .methods.masks import apply_mask, pack_bits, unpack_bits
from .outdir import (
    RECORD_FILE,
    OutputLock,
    check_destination,
    check_not_source,
    check_output_dir,
    copy_support_files,
    prepare_output_dir,
    support_bytes,
    write_json,
)
from .reconstruct import OPTIMIZERS, make_optimizer
from .runstate import check_free_space, check_same_structure, source_fingerprint
from .stream import Source, check_weights_finite, open_source
from .writer import CheckpointWriter, write_atomic

# bitsandbytes (imported by peft too) logs a notice about an optional CPU kernel package; not ours to show
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

BASES = ("auto", "nf4", "int8", "bf16", "fp32")
HEAL_STATE_DIR = ".heal"  # in --out while a heal is unfinished: adapters, optimizer, step
STATE_FILE = "state.pt"
ADAPTER_DIR = "adapter"  # peft's adapter_config.json and adapter_model.safetensors
WARMUP_FRACTION = 0.05  # of --steps: the learning rate rises linearly, then decays as a cosine to 0


@dataclass
class HealConfig:
    model: str
    out: Path
    data: str = "c4"  # training text: c4 or a local file, as run's --calib
    steps: int = 200
    batch_size: int = 4  # sequences per optimizer step
    seqlen: int = 512
    lr: float = 2e-4
    lora_rank: int = 16
    lora_alpha: float = 32.0
    base: str = "auto"  # nf4 on a GPU, fp32 on a CPU
    optimizer: str = "adam"  # or adam8bit (bitsandbytes)
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 50  # steps between saves of the training state
    gradient_checkpointing: bool = True
    max_shard_size: str = "5GB"
    eval_ppl: Path | None = None
    eval_seqlen: int = 512
    force: bool = False
    quiet: bool = False

    def __post_init__(self):
        self.out = Path(self.out)
        check_positive(self, "steps", "batch_size", "seqlen", "lr", "lora_rank", "lora_alpha", "checkpoint_every",
                       "eval_seqlen")  # fmt: skip
        check_seed(self.seed)
        check_choice("--base", self.base, BASES)
        check_choice("--optimizer", self.optimizer, OPTIMIZERS)
        self.torch_device = parse_device(self.device)
        self.max_shard_bytes = parse_shard_size(self.max_shard_size)
        self.base = resolve_base(self.base, self.torch_device.type)
        check_eval_text(self.eval_ppl, self.eval_seqlen, "--eval-ppl", "--eval-seqlen")

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.base, self.torch_device.type)

    @property
    def data_flags(self) -> DataFlags:
        return DataFlags(text="--data", count="--steps", windows_per_count=self.batch_size,
                         count_suffix=f" x --batch-size {self.batch_size}")  # fmt: skip

    def identity(self, source: Source, data_sha256: str) -> dict:
        """What shapes the result: a saved state made with other values cannot be resumed."""
        keys = ("data", "steps", "batch_size", "seqlen", "lr", "lora_rank", "lora_alpha", "base", "optimizer", "seed",
                "gradient_checkpointing")  # fmt: skip
        return {"source": source_fingerprint(source.checkpoint), "data_sha256": data_sha256,
                **{key: getattr(self, key) for key in keys}}  # fmt: skip


def resolve_base(base: str, device_type: str) -> str:
    """--base auto: nf4 on a GPU (QLoRA), fp32 on a CPU."""
    if base != "auto":
        return base
    return "nf4" if device_type == "cuda" else "fp32"


def compute_dtype(base: str, device_type: str) -> torch.dtype:
    """Activations, norms, embeddings and adapters: float32, except bf16 where the base is bf16
    or a quantized base runs on a GPU (QLoRA's compute dtype)."""
    if base == "bf16" or (base in ("nf4", "int8") and device_type == "cuda"):
        return torch.bfloat16
    return torch.float32


NOT_MOE = (
    "streamprune heal trains dense models so far (transformers holds the experts as stacked tensors, not Linears peft "
    "can adapt). Its block reconstruction works: streamprune run MODEL --reconstruct ..."
)


def heal(config: HealConfig) -> dict:
    """Train LoRA adapters on the pruned `config.model`, merge them through its masks, write the
    checkpoint to `config.out`; returns the record (also written as streamprune.json)."""
    started = time.perf_counter()
    buffers.return_freed_memory_to_the_system()  # every step frees and reallocates each block's weights
    source = open_source(config.model, torch.device("cpu"), "float32")  # checks only; the model loads below
    if source.names != TEXT_ONLY:
        raise UsageError(
            f"{source.directory} is a vision-language checkpoint ({source.family.architecture}'s language model "
            "with a vision tower); streamprune heal trains text-only models so far. Its block reconstruction "
            "works: streamprune run MODEL --reconstruct ..."
        )
    if source.family.experts is not None:
        raise UsageError(f"{source.directory} is a mixture-of-experts model ({source.family.architecture}); {NOT_MOE}")
    check_not_source(config.out, source.directory)
    with OutputLock(config.out) as lock:
        lock.check()
        state = load_heal_state(config.out)
        if state is None or config.force:
            check_output_dir(config.out, config.force)
        check_destination(config.out, "--out")
        data_path = calibration_path(config.data, config.data_flags)
        data_sha256 = file_sha256(data_path)
        identity = config.identity(source, data_sha256)
        if state is not None and not config.force:
            check_same_structure(state["identity"], identity, config.out, "an unfinished heal")
        else:
            state = None
        ids = training_ids(config, source, data_path, data_sha256)  # bad text is found before anything is written
        lock.acquire()
        if state is None:
            prepare_output_dir(config.out, config.force)
            shutil.rmtree(config.out / HEAL_STATE_DIR, ignore_errors=True)
            shutil.rmtree(config.out / ADAPTER_DIR, ignore_errors=True)
        model, keep = load_base(source, config)
        source_zeros = zero_weights(model, keep)
        if source_zeros == 0 and not config.quiet:
            print(f"{source.directory} has no zero weights in its projections: healing it as a dense model "
                  "(every weight trains; prune it first with streamprune run to keep a sparsity)", file=sys.stderr)  # fmt: skip
        peft_model, adapters = add_adapters(model, keep, config)
        optimizer = make_optimizer(config.optimizer, adapters.values(), config.lr)
        losses, start = [], 0
        if state is not None:
            start, losses = restore(state, adapters, optimizer)
        check_heal_disk(config, source, adapters)  # before the training, not after it
        losses = train(peft_model, adapters, optimizer, ids, config, start, losses, identity)
        files, written = write_merged(config, source, model, keep)
        peft_model.save_pretrained(config.out / ADAPTER_DIR)
        record = heal_record(config, source, losses, start, files, written, started)
        record["source_zero_weights"] = source_zeros
        if config.eval_ppl is not None:
            record["evaluation"] = evaluate_output(config)
        write_json(config.out / RECORD_FILE, record)
        shutil.rmtree(config.out / HEAL_STATE_DIR, ignore_errors=True)  # none when no save was due
    return record


def training_ids(config: HealConfig, source: Source, path: Path, sha256: str) -> torch.Tensor:
    """steps x batch_size windows of seqlen tokens of --data, [steps * batch_size, seqlen]."""
    seqlen = source.capped_seqlen(config.seqlen)
    settings = SimpleNamespace(calib=config.data, nsamples=config.steps * config.batch_size, seed=config.seed)
    ids = sample_calibration(settings, path, sha256, source.directory, seqlen, config.data_flags)["input_ids"]
    source.check_token_ids(ids)
    return ids


# -- the model: a frozen base with masked LoRA adapters --------------------------------------------------


def target_names(source: Source) -> list[str]:
    """The Linears that get adapters: the pruned projections of every block (module names)."""
    linears = source.family.projections.names
    return [source.names.layer(i) + linear for i in range(source.num_layers) for linear in linears]


def lora_targets(names) -> str:
    """peft's target_modules for these module names (model.layers.{i}.{local}), as one regex over
    their local names, sorted: a list would be saved as a set, in a different order each run."""
    locals_ = sorted({name.split(".", 3)[3] for name in names})
    return r"model\.layers\.\d+\.(" + "|".join(re.escape(local) for local in locals_) + ")"


def load_base(source: Source, config: HealConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The whole model on the device, built from transformers' own class on the meta device and
    filled tensor by tensor from the source (peak: the model as stored on the device, plus one
    tensor). The projections become --base Linears, frozen; returns (model, {Linear: packed keep
    bits of its weight [out, ceil(in / 8)]})."""
    from transformers import AutoModelForCausalLM

    device, compute = config.torch_device, config.compute_dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(source.runner.config, dtype=compute)
    targets = set(target_names(source))
    keep = {}
    expected = set(model.state_dict())
    for name in tqdm(list(source.checkpoint.tensors), desc="loading", unit="tensor", disable=config.quiet):
        module_name, _, kind = name.rpartition(".")
        tensor = source.checkpoint.read(name)
        check_weights_finite(tensor, name)
        if module_name in targets and kind == "weight":
            keep[module_name] = pack_bits(tensor != 0).to(device)
            bias = model.get_submodule(module_name).bias  # Qwen2's q/k/v, width's compensation: loaded already
            linear = frozen_linear(tensor, config.base, compute, device)
            if bias is not None:  # still on meta where it comes after the weight: set below, as any tensor
                linear.bias = torch.nn.Parameter(bias, requires_grad=False)
            set_module(model, module_name, linear)
        elif name in expected:
            set_tensor(model, name, tensor.to(device, compute))
    rotary = type(model.model.rotary_emb)  # its inverse frequencies are computed, not stored
    model.model.rotary_emb = rotary(config=model.config).to(device)
    if source.embedding_scale is not None:  # Gemma's scale: a computed buffer too
        model.model.embed_tokens.embed_scale = torch.tensor(source.embedding_scale, device=device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise UsageError(f"the checkpoint in {source.directory} has no tensor for {', '.join(missing[:3])}")
    model.requires_grad_(False)
    model.config.use_cache = False
    return model, keep


def set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def set_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attribute in module._parameters:
        module._parameters[attribute] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attribute] = tensor


def frozen_linear(weight: torch.Tensor, base: str, compute: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A bias-free projection holding `weight` [out, in] as --base: bitsandbytes' NF4 (4-bit,
    block-wise absmax, computing in `compute`) or LLM.int8 (row-wise absmax), or a plain Linear in
    bf16/fp32. Every source zero is zero in each of them (0 is an exact NF4 and int8 code)."""
    out_features, in_features = weight.shape
    if base in ("fp32", "bf16"):
        linear = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
        linear.weight = torch.nn.Parameter(weight.to(device, compute), requires_grad=False)
        return linear
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise UsageError(f"--base {base} needs bitsandbytes: pip install 'streamprune[heal]', or use --base bf16") from err

    data = weight.to(torch.float32 if device.type == "cpu" else torch.float16)
    if base == "nf4":
        linear = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute, quant_type="nf4",
                                   device="meta")  # fmt: skip
        linear.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4")
        # in eval mode bitsandbytes would repack the weights for a bfloat16 CPU kernel: the model
        # must compute the same whether it trains or not
        linear.support_avx512bf16_for_cpu = False
    else:
        linear = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, device="meta")
        linear.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    return linear.to(device)  # quantizes


def zero_weights(model: torch.nn.Module, keep: dict[str, torch.Tensor]) -> int:
    """How many weights of the target Linears are zero in the source (their keep bits unset)."""
    zeros = 0
    for name, packed in keep.items():
        cols = model.get_submodule(name).in_features
        zeros += packed.shape[0] * cols - int(unpack_bits(packed, cols).sum())
    return zeros


def add_adapters(model: torch.nn.Module, keep: dict[str, torch.Tensor], config: HealConfig) -> tuple:
    """peft LoRA (rank r, alpha, no dropout; A seeded by --seed, B zero, float32) on every target
    Linear of `model` (changed in place), each delta applied through its Linear's keep-mask;
    returns (the PeftModel around it, {adapter parameter name: parameter})."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise UsageError("streamprune heal needs peft: pip install 'streamprune[heal]' (peft and bitsandbytes)") from err
    if config.gradient_checkpointing:  # named activation checkpointing from transformers 5.2x on
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=lora_targets(keep), bias="none", task_type="CAUSAL_LM")  # fmt: skip
    with warnings.catch_warnings():  # peft asks transformers by the old name, which warns
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    for name, bits in keep.items():
        module = model.get_submodule(name)
        module.register_buffer("keep_bits", bits, persistent=False)
        module.forward = types.MethodType(masked_lora_forward, module)
    adapters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return peft_model, adapters


def masked_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA Linear, but the delta (B A) x scaling acts through the keep-mask, so the pruned
    weights stay zero in the model that trains as in the one that is written. One matmul with
    base + delta: a masked delta cannot take LoRA's low-rank shortcut x A^T B^T anyway."""
    delta = masked_delta(self)
    weight = base_weight(self.base_layer).to(delta.dtype) + delta  # [out, in]
    bias = self.base_layer.bias  # [out] or None: Qwen2's q/k/v, width's compensation
    return F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).to(x.dtype)


def base_weight(linear: torch.nn.Module) -> torch.Tensor:
    """The frozen base's weight [out, in] as the model computes with it: bitsandbytes' NF4 blocks
    dequantized (what its own forward does), int8 rows times their absmax / 127, or the plain weight
    (which needs no bitsandbytes)."""
    weight = linear.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes' Params4bit
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if getattr(weight, "SCB", None) is not None:  # bitsandbytes' Int8Params
        return weight.data.float() * weight.SCB.float().unsqueeze(1) / 127
    return weight


def masked_delta(lora_linear) -> torch.Tensor:
    """keep x (B A) x scaling, [out, in], of a peft LoRA Linear with a keep_bits buffer."""
    a, b = lora_linear.lora_A["default"].weight, lora_linear.lora_B["default"].weight  # [r, in], [out, r]
    keep = unpack_bits(lora_linear.keep_bits, a.shape[1])
    return torch.where(keep, (b @ a) * lora_linear.scaling["default"], torch.zeros((), dtype=a.dtype, device=a.device))


# -- training -------------------------------------------------------------------------------------------------


def learning_rate(config: HealConfig, step: int) -> float:
    """Linear warmup over the first WARMUP_FRACTION of the steps, then a cosine decay to zero."""
    warmup = max(1, round(WARMUP_FRACTION * config.steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(model, adapters: dict, optimizer, ids: torch.Tensor, config: HealConfig, start: int, losses: list,
          identity: dict) -> list[float]:  # fmt: skip
    """Steps start..steps-1, each on the next batch_size windows of `ids`; the state is saved every
    --checkpoint-every steps. Returns the mean loss of every step so far."""
    model.train()  # gradient checkpointing acts only in training mode; no layer has dropout
    tokens_per_step = config.batch_size * ids.shape[1]
    bar = tqdm(total=config.steps, initial=start, desc="healing", unit="step", disable=config.quiet)
    tick = time.perf_counter()
    for step in range(start, config.steps):
        batch = ids[step * config.batch_size : (step + 1) * config.batch_size].to(config.torch_device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapters.values(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise UsageError(f"the loss is {losses[-1]} at step {step + 1}; lower --lr (now {config.lr})")
        now = time.perf_counter()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_step / (now - tick):.0f}")
        tick = now
        bar.update(1)
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save_state(config.out, identity, step + 1, losses, adapters, optimizer)
    bar.close()
    return losses


def save_state(out: Path, identity: dict, step: int, losses: list, adapters: dict, optimizer) -> None:
    """The adapters, the optimizer and the step, in one file replaced atomically."""
    buffer = io.BytesIO()
    torch.save({"identity": identity, "step": step, "losses": losses, "optimizer": optimizer.state_dict(),
                "adapters": {name: p.detach().cpu() for name, p in adapters.items()}}, buffer)  # fmt: skip
    (out / HEAL_STATE_DIR).mkdir(exist_ok=True)
    write_atomic(out / HEAL_STATE_DIR / STATE_FILE, buffer.getvalue())


def load_heal_state(out: Path) -> dict | None:
    path = out / HEAL_STATE_DIR / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"the saved heal state {path} cannot be read ({err}); add --force to start over") from err


def restore(state: dict, adapters: dict, optimizer) -> tuple[int, list]:
    for name, parameter in adapters.items():
        parameter.data.copy_(state["adapters"][name])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], list(state["losses"])


# -- output ------------------------------------------------------------------------------------------------


# what one adapter weight takes on disk at most: its value in the adapter file and in the training
# state, and Adam's two float32 moments (adam8bit's are smaller)
ADAPTER_DISK_BYTES = 4 + 4 + 8


def merged_writer(config: HealConfig, source: Source) -> CheckpointWriter:
    info = source.checkpoint.tensors
    return CheckpointWriter(config.out, [(n, info[n].dtype, info[n].shape) for n in info], config.max_shard_bytes)


def merged_bytes_needed(config: HealConfig, source: Source, writer: CheckpointWriter) -> dict[str, int]:
    """The merged checkpoint and the files beside it, less what an interrupted attempt left that the
    write replaces: its partial shard is overwritten, and a complete one is replaced when its new copy
    is complete (so the largest shard is needed twice at most)."""
    partial = sum(p.stat().st_size for p in config.out.glob(".model-*.safetensors.partial") if p.is_file())
    complete = sum((config.out / f).stat().st_size for f in writer.files if (config.out / f).is_file())
    largest = max(8 + len(shard.header()) + shard.data_bytes for shard in writer.shards)
    left = partial + max(0, complete - largest)
    return {"output checkpoint": max(0, writer.total_bytes - left),
            "config and tokenizer files": support_bytes(source.directory)}  # fmt: skip


def check_heal_disk(config: HealConfig, source: Source, adapters: dict) -> None:
    """Room for everything heal writes, checked before it trains: the merged checkpoint, the files
    beside it, the adapters and their training state (a new state file is complete before the old
    one goes)."""
    adapter_weights = sum(p.numel() for p in adapters.values())
    needed = merged_bytes_needed(config, source, merged_writer(config, source))
    check_free_space(config.out, {**needed, "adapters and training state": adapter_weights * ADAPTER_DISK_BYTES})


def write_merged(config: HealConfig, source: Source, model, keep: dict) -> tuple[list[str], int]:
    """Every source tensor in its own dtype and name, the projections with their masked delta
    added to the source's own weight (not to the quantized base the adapters trained beside)."""
    names = list(source.checkpoint.tensors)
    writer = merged_writer(config, source)
    check_free_space(config.out, merged_bytes_needed(config, source, writer))
    try:
        with torch.no_grad():
            for name in tqdm(names, desc="merging", unit="tensor", disable=config.quiet):
                tensor = source.checkpoint.read(name)
                module_name = name.rpartition(".")[0]
                if module_name in keep and name.endswith(".weight"):  # a projection's bias is written as it is
                    delta = masked_delta(model.get_submodule(module_name)).to("cpu", torch.float32)
                    merged = (tensor.to(torch.float32) + delta).to(tensor.dtype)
                    tensor = apply_mask(merged, tensor == 0)  # the source's zeros, +0.0
                writer.write(name, tensor)
        copy_support_files(source.directory, config.out)  # before the index, written last
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return writer.files, writer.total_bytes


def heal_record(config: HealConfig, source: Source, losses: list, start: int, files, written: int,
                started: float) -> dict:  # fmt: skip
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return {
        "command": "heal",
        "arguments": arguments,
        "source": str(source.directory),
        "device": str(config.torch_device),
        "compute_dtype": str(config.compute_dtype).removeprefix("torch."),
        "losses": losses,
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "resumed_from_step": start,
        "tokens": config.steps * config.batch_size * config.seqlen,
        "output_files": files,
        "output_bytes": written,
        "adapter": ADAPTER_DIR,
        "total_seconds": time.perf_counter() - started,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_vram_bytes": torch.cuda.max_memory_allocated() if config.torch_device.type == "cuda" else None,
    }


def evaluate_output(config: HealConfig) -> dict:
    from .evaluate import EvalConfig, evaluate

    return evaluate(EvalConfig(model=str(config.out), ppl=str(config.eval_ppl), seqlen=config.eval_seqlen,
                               device=config.device, quiet=config.quiet))  # fmt: skip


def kept_zeros(record: dict) -> str:
    if record.get("source_zero_weights") == 0:
        return "merged; the source had no zeros, so it was healed as a dense model"
    return "merged, every pruned weight still zero"


def summary(record: dict) -> str:
    lines = [
        f"healed {record['source']} with LoRA (rank {record['arguments']['lora_rank']}, base "
        f"{record['arguments']['base']}) for {record['arguments']['steps']} steps in {record['total_seconds']:.0f} s "
        f"on {record['device']}: loss {record['first_loss']:.3f} -> {record['last_loss']:.3f}",
        f"wrote {record['arguments']['out']} ({kept_zeros(record)}) and its adapter in "
        f"{ADAPTER_DIR}/; record: {RECORD_FILE}",
    ]
    if "evaluation" in record:
        lines.append(f"perplexity on {record['arguments']['eval_ppl']}: {record['evaluation']['perplexity']['ppl']:.2f}")
    return "\n".join(lines)
