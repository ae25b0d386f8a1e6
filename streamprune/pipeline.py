"""The layer loop: prune a checkpoint one decoder layer at a time, never holding the whole model.

`prune(config)` is the library entry point the CLI calls. It is the only place that touches the
device, the disk and the calibration buffers together; its steps are numbered below.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from . import __version__
from .calibration import fetch_c4, file_sha256, read_documents, sample_windows
from .checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from .config import DTYPES, PruneConfig
from .errors import BadInputError, UsageError
from .families import EMBEDDING, LAYER_PREFIX, PRUNABLE_LINEARS, LayerStack, family_of
from .source import resolve_model
from .sparsity import apply_mask, prune_mask
from .writer import CheckpointWriter, write_atomic

RECORD_FILE = "streamprune.json"
CALIBRATION_FILE = "streamprune_calibration.json"
_EMBEDDING_SLICE_BYTES = 64 * 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")

# observe(layer_index, hidden) sees the CPU buffer [nsamples, seqlen, hidden] after each layer:
# the inputs of the next layer. Tests use it to compare against the whole model.
Observer = Callable[[int, torch.Tensor], None]


def prune(config: PruneConfig, observe: Observer | None = None) -> dict:
    """Prune `config.model` into `config.out`; returns the run record (also written as streamprune.json)."""
    started = time.perf_counter()
    device = config.torch_device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # 1. find and check the source; nothing is written until every check has passed
    source_dir = resolve_model(config.model)
    checkpoint = Checkpoint(source_dir)
    family = family_of(checkpoint.config)
    num_layers = checkpoint.config["num_hidden_layers"]
    check_output_dir(config.out, source_dir, config.force)
    dtype = compute_dtype(config, checkpoint)
    stack = LayerStack(source_dir, family, device, dtype)
    layer_names = layout(checkpoint, stack, num_layers)
    check_pattern_fits(config, stack)
    seqlen = min(config.seqlen, getattr(stack.config, "max_position_embeddings", None) or config.seqlen)

    # 2. calibration windows (Wanda only: magnitude looks at the weights alone)
    calibration = None
    if config.method == "wanda":
        calibration = load_calibration(config, source_dir, seqlen)
        vocab = checkpoint.tensors[EMBEDDING].shape[0]
        if int(calibration["input_ids"].max()) >= vocab:
            raise BadInputError(
                f"the tokenizer in {source_dir} produced token id {int(calibration['input_ids'].max())}, but the "
                f"embedding has only {vocab} rows; the tokenizer does not belong to this model"
            )

    # 3. the output directory and its planned shard layout
    prepare_output_dir(config.out, config.force)
    all_names = layer_names[None] + [name for i in range(num_layers) for name in layer_names[i]]
    info = checkpoint.tensors
    writer = CheckpointWriter(
        config.out, [(n, info[n].dtype, info[n].shape) for n in all_names], config.max_shard_bytes
    )
    layers_record = []
    try:
        # 4. tensors outside the decoder layers are copied unchanged
        for name in layer_names[None]:
            writer.write(name, checkpoint.read(name))

        # 5. embed the calibration tokens into the CPU activation buffer [nsamples, seqlen, hidden]
        hidden = None
        if calibration is not None:
            hidden = embed(checkpoint, calibration["input_ids"], dtype)

        # 6. one decoder layer at a time
        progress = tqdm(range(num_layers), desc="pruning", unit="layer", disable=config.quiet, dynamic_ncols=True)
        for index in progress:
            layer_started = time.perf_counter()
            names = layer_names[index]  # checkpoint name -> name inside the layer module
            # 6a. read only this layer's tensors, in their stored dtype, and build the layer
            stored = {local: checkpoint.read(name) for name, local in names.items()}
            layer = stack.build(index, stored)
            # 6b. Wanda: one forward of the dense layer collects ||X_j||^2 for every Linear
            sq_norms = None
            if hidden is not None:
                sq_norms = forward_all(
                    stack, layer, index, hidden, config.batch_size, collect=True, write_back=config.propagate == "dense"
                )
            # 6c. all seven Linears pruned together, from the dense statistics
            masks = {}
            for local in PRUNABLE_LINEARS:
                module = layer.get_submodule(local)
                mask = prune_mask(
                    module.weight,
                    config.method,
                    config.sparsity,
                    config.keep_block(),
                    None if sq_norms is None else sq_norms[local],
                )
                module.weight.data = apply_mask(module.weight.data, mask)
                masks[local + ".weight"] = mask.cpu()
            # 6d. write the pruned layer in its original dtype, zeros as +0.0
            zeros = total = 0
            for name, local in names.items():
                tensor = stored[local]
                if local in masks:
                    tensor = apply_mask(tensor, masks[local])
                    zeros += int((tensor == 0).sum())
                    total += tensor.numel()
                writer.write(name, tensor)
            # 6e. the next layer's inputs: outputs of the pruned layer (the default)
            if hidden is not None and config.propagate == "pruned":
                forward_all(stack, layer, index, hidden, config.batch_size, collect=False, write_back=True)
            if observe is not None and hidden is not None:
                observe(index, hidden)
            del layer, stored, masks
            seconds = time.perf_counter() - layer_started
            layers_record.append({"layer": index, "sparsity": zeros / total, "seconds": seconds})
        progress.close()

        # 7. finish: the index, then config and tokenizer, then the calibration ids and the record
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    copy_support_files(source_dir, config.out)
    record = run_record(
        config,
        source_dir,
        family.architecture,
        num_layers,
        dtype,
        seqlen,
        calibration,
        layers_record,
        writer.files,
        started,
    )
    if calibration is not None:
        ids = {key: value for key, value in calibration.items() if key != "input_ids"}
        ids["input_ids"] = calibration["input_ids"].tolist()
        write_atomic(config.out / CALIBRATION_FILE, json.dumps(ids).encode())
    write_atomic(config.out / RECORD_FILE, (json.dumps(record, indent=2) + "\n").encode())
    return record


def check_output_dir(out: Path, source_dir: Path, force: bool) -> None:
    """Refuse an --out that is, or is inside, the source, and a non-empty one without --force."""
    out_resolved, source_resolved = out.resolve(), source_dir.resolve()
    if out_resolved == source_resolved or source_resolved in out_resolved.parents:
        where = "the source directory" if out_resolved == source_resolved else "inside the source directory"
        raise UsageError(
            f"--out {out} is {where} {source_dir}; streamprune never writes into the source. "
            f"Choose another --out, e.g. --out {source_dir.name}-pruned"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(
            f"--out {out} is not empty; choose an empty or new directory, or add --force to replace the "
            "checkpoint in it"
        )


def prepare_output_dir(out: Path, force: bool) -> None:
    """Create --out; with --force, remove the weights of an earlier checkpoint there, which would
    otherwise be loaded instead of (or mixed with) the new one. Nothing else is touched."""
    out.mkdir(parents=True, exist_ok=True)
    if force:
        stale = [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors"), *out.glob(".*.partial")]
        for path in stale:
            if path.is_file():
                path.unlink()


def compute_dtype(config: PruneConfig, checkpoint: Checkpoint) -> torch.dtype:
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    probe = f"{LAYER_PREFIX.format(index=0)}{PRUNABLE_LINEARS[0]}.weight"
    info = checkpoint.tensors.get(probe)
    if info is None:
        raise BadInputError(f"the checkpoint has no tensor {probe!r}; is it a complete decoder-only model?")
    if info.torch_dtype not in DTYPES.values():
        raise BadInputError(
            f"{probe} is stored as {info.dtype}; streamprune prunes float32, bfloat16 and float16 checkpoints, "
            "not quantized ones"
        )
    return info.torch_dtype


def layout(checkpoint: Checkpoint, stack: LayerStack, num_layers: int) -> dict:
    """Group the checkpoint's tensors: {None: names outside the layers, i: {name: local name}}.

    Every parameter a layer needs must be present with the shape the config implies; tensors a
    layer does not use (e.g. old rotary buffers) are copied through with their layer.
    """
    expected = {name: tuple(p.shape) for name, p in stack.skeleton(0).state_dict().items()}
    groups: dict = {None: [], **{i: {} for i in range(num_layers)}}
    prefixes = {LAYER_PREFIX.format(index=i): i for i in range(num_layers)}
    for name in sorted(checkpoint.tensors):
        head = name.split(".")
        prefix = ".".join(head[:3]) + "."
        if prefix in prefixes:
            groups[prefixes[prefix]][name] = name[len(prefix) :]
        else:
            groups[None].append(name)
    for index in range(num_layers):
        present = set(groups[index].values())
        for local, shape in expected.items():
            full = LAYER_PREFIX.format(index=index) + local
            if local not in present:
                raise BadInputError(
                    f"the checkpoint has no tensor {full!r}; it is incomplete or not a {stack.config.model_type} model"
                )
            got = checkpoint.tensors[full].shape
            if got != shape:
                raise BadInputError(f"tensor {full!r} has shape {list(got)}, but config.json implies {list(shape)}")
    required = [EMBEDDING, "model.norm.weight"]
    if not getattr(stack.config, "tie_word_embeddings", False):
        required.append("lm_head.weight")
    for name in required:
        if name not in checkpoint.tensors:
            raise BadInputError(f"the checkpoint has no tensor {name!r}; it is incomplete")
    return groups


def check_pattern_fits(config: PruneConfig, stack: LayerStack) -> None:
    block = config.keep_block()
    if block is None:
        return
    layer = stack.skeleton(0)
    for local in PRUNABLE_LINEARS:
        width = layer.get_submodule(local).in_features
        if width % block[1]:
            raise UsageError(
                f"--pattern {config.pattern}: M={block[1]} does not divide the input width {width} of {local}; "
                "choose an M that divides every Linear's input width (4 and 8 do for all supported models)"
            )


def load_calibration(config: PruneConfig, source_dir: Path, seqlen: int) -> dict:
    from transformers import AutoTokenizer

    path = fetch_c4() if config.calib == "c4" else Path(config.calib).expanduser()
    if not path.is_file():
        raise BadInputError(f"--calib {config.calib}: no such file; pass a .txt, .jsonl or .jsonl.gz file, or c4")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir)
    except Exception as err:
        raise BadInputError(f"cannot load the tokenizer from {source_dir}: {err}") from err
    documents = read_documents(path)
    input_ids = sample_windows(documents, tokenizer, config.nsamples, seqlen, config.seed)
    return {
        "source": config.calib if config.calib == "c4" else str(path),
        "file": str(path),
        "sha256": file_sha256(path),
        "documents": len(documents),
        "nsamples": config.nsamples,
        "seqlen": seqlen,
        "seed": config.seed,
        "input_ids": input_ids,
    }


def embed(checkpoint: Checkpoint, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The calibration tokens' embeddings, [nsamples, seqlen, hidden] on the CPU.

    The embedding matrix (2 GB for Llama-3-70B) is read in slices of rows, and each slice fills
    the tokens that fall in it, a bounded run of tokens at a time: neither the whole matrix nor a
    second buffer-sized temporary is ever in memory.
    """
    info = checkpoint.tensors[EMBEDDING]
    vocab, width = info.shape
    hidden = torch.empty(*input_ids.shape, width, dtype=dtype)
    flat_ids, flat_hidden = input_ids.reshape(-1), hidden.view(-1, width)  # [tokens], [tokens, width]
    rows_per_slice = max(1, _EMBEDDING_SLICE_BYTES // max(1, info.nbytes // vocab))
    tokens_per_copy = max(1, _EMBEDDING_SLICE_BYTES // (width * hidden.element_size()))
    for first in range(0, vocab, rows_per_slice):
        positions = ((flat_ids >= first) & (flat_ids < first + rows_per_slice)).nonzero().squeeze(1)
        if positions.numel():
            table = checkpoint.read(EMBEDDING, rows=slice(first, first + rows_per_slice)).to(dtype)
            for run in positions.split(tokens_per_copy):
                flat_hidden[run] = table[flat_ids[run] - first]
    return hidden


@torch.no_grad()
def forward_all(
    stack: LayerStack,
    layer: torch.nn.Module,
    index: int,
    hidden: torch.Tensor,
    batch_size: int,
    collect: bool,
    write_back: bool,
) -> dict[str, torch.Tensor] | None:
    """Run every calibration sample through `layer` in micro-batches.

    collect: return, per prunable Linear, ||X_j||^2 / nsamples for each input feature j (float32).
    write_back: replace each micro-batch of `hidden` by the layer's output (in place: a sample's
    input is not needed once its output exists).
    """
    sq_norms: dict[str, torch.Tensor] = {}
    samples_seen = {local: 0 for local in PRUNABLE_LINEARS}
    handles = []
    if collect:
        for local in PRUNABLE_LINEARS:
            module = layer.get_submodule(local)
            sq_norms[local] = torch.zeros(module.in_features, dtype=torch.float32, device=stack.device)

            # A running mean over samples, in the reference's exact arithmetic: a plain float32 sum
            # ranks the same in exact math but rounds differently, and one flipped near-tie changes
            # every later layer. With one sample per micro-batch the masks then match it bit for bit.
            def hook(_module, args, _output, local=local):
                for sample in args[0]:  # [seqlen, in]
                    samples_seen[local] += 1
                    n = samples_seen[local]
                    sq_norms[local] *= (n - 1) / n
                    sq_norms[local] += torch.norm(sample.t().float(), p=2, dim=1) ** 2 / n

            handles.append(module.register_forward_hook(hook))
    try:
        for start in range(0, hidden.shape[0], batch_size):
            x = hidden[start : start + batch_size].to(stack.device)
            y = stack.forward(layer, index, x)
            if write_back:
                hidden[start : start + batch_size] = y.to("cpu")
    finally:
        for handle in handles:
            handle.remove()
    return sq_norms if collect else None


def copy_support_files(source_dir: Path, out: Path) -> None:
    """config.json, generation_config.json, tokenizer files and the like, byte for byte."""
    for path in sorted(source_dir.iterdir()):
        if (
            path.name in (RECORD_FILE, CALIBRATION_FILE)
            or path.name.endswith(_WEIGHT_SUFFIXES)
            or path.name == INDEX_FILE
            or path.name.startswith(".")
            or not path.is_file()
        ):
            continue
        write_atomic(out / path.name, path.read_bytes())


def run_record(
    config, source_dir, architecture, num_layers, dtype, seqlen, calibration, layers, files, started
) -> dict:
    import transformers

    device = config.torch_device
    total_zeros = sum(layer["sparsity"] for layer in layers) / max(1, len(layers))
    record = {
        "streamprune": __version__,
        "command": sys.argv,
        "arguments": config.as_record(),
        "source": {
            "model": config.model,
            "directory": str(source_dir),
            "architecture": architecture,
            "num_hidden_layers": num_layers,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "target_sparsity": config.target_sparsity,
        "mean_layer_sparsity": total_zeros,
        "calibration": None,
        "layers": layers,
        "output_files": files,
        "total_seconds": time.perf_counter() - started,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_vram_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    if calibration is not None:
        record["calibration"] = {k: v for k, v in calibration.items() if k != "input_ids"}
        record["calibration"]["ids_file"] = CALIBRATION_FILE
        if seqlen != config.seqlen:
            record["calibration"]["seqlen_capped_from"] = config.seqlen
    return record
