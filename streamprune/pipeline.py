"""The layer loop: prune a checkpoint one decoder layer at a time, never holding the whole model.

`prune(config)` is the library entry point the CLI calls. It is the only place that touches the
device, the disk and the calibration buffers together; its steps are numbered below.
"""

from __future__ import annotations

import json
import platform
import resource
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from . import __version__, buffers, plan
from .background import Worker
from .calibration import fetch_c4, file_sha256, read_documents, sample_windows
from .checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from .config import DTYPES, PruneConfig
from .errors import BadInputError, Interrupted, ResourceError, UsageError
from .families import EMBEDDING, LAYER_PREFIX, PRUNABLE_LINEARS, LayerStack, family_of
from .runstate import OFFLOAD_DIR, STATE_DIR, RunState, check_free_space, source_fingerprint
from .source import resolve_model
from .sparsity import apply_mask, prune_mask
from .writer import CheckpointWriter, write_atomic

RECORD_FILE = "streamprune.json"
CALIBRATION_FILE = "streamprune_calibration.json"
_FINITE_CHECK_ELEMENTS = 1 << 20  # isfinite makes float temporaries of a slice: keep them ~4 MB
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")

# observe(layer_index, hidden) sees the CPU buffer [nsamples, seqlen, hidden] after each layer:
# the inputs of the next layer. Tests use it to compare against the whole model.
Observer = Callable[[int, torch.Tensor], None]


def prune(config: PruneConfig, observe: Observer | None = None) -> dict:
    """Prune `config.model` into `config.out`, resuming an interrupted run there; returns the run
    record (also written as streamprune.json)."""
    started = time.perf_counter()
    device = config.torch_device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    buffers.return_freed_memory_to_the_system()

    # 1. find and check the source; nothing is written until every check has passed
    source_dir = resolve_model(config.model)
    checkpoint = Checkpoint(source_dir)
    family = family_of(checkpoint.config)
    num_layers = checkpoint.config["num_hidden_layers"]
    check_not_source(config.out, source_dir)
    dtype = compute_dtype(config, checkpoint)
    stack = LayerStack(source_dir, family, device, dtype)
    layer_names = layout(checkpoint, stack, num_layers)
    check_pattern_fits(config, stack)
    seqlen = min(config.seqlen, getattr(stack.config, "max_position_embeddings", None) or config.seqlen)

    # 1b. the plan: what the run will hold at its peaks, against the RAM and GPU memory it may use;
    # --offload auto and --batch-size auto are decided here (a resumed run keeps its batch size),
    # and a run that cannot fit stops now
    if config.batch_size is None and RunState.exists(config.out) and not config.force:
        config.batch_size = RunState.load(config.out).structure.get("batch_size")
    run_plan, offload_dir = plan_run(config, checkpoint, dtype, seqlen)

    # 2. a new run, or the resumption of the unfinished one in --out (same settings only)
    calib_path = calibration_path(config) if config.method == "wanda" else None
    structure = run_structure(config, checkpoint, dtype, seqlen, calib_path)
    resuming = RunState.exists(config.out) and not config.force
    if resuming:
        state = RunState.load(config.out)
        state.check_same_run(structure, config.out)
    else:
        check_output_dir(config.out, config.force)
        state = RunState(config.out, structure)

    # 3. calibration windows (Wanda only: magnitude looks at the weights alone)
    calibration = None
    if calib_path is not None:
        if resuming and (config.out / CALIBRATION_FILE).is_file():
            calibration = load_saved_calibration(config.out, config.nsamples, seqlen)
        else:
            calibration = sample_calibration(config, calib_path, structure["calibration"]["sha256"], source_dir, seqlen)
        vocab = checkpoint.tensors[EMBEDDING].shape[0]
        if int(calibration["input_ids"].max()) >= vocab:
            raise BadInputError(
                f"the tokenizer in {source_dir} produced token id {int(calibration['input_ids'].max())}, but the "
                f"embedding has only {vocab} rows; the tokenizer does not belong to this model"
            )

    # 4. the planned shard layout, and room on the disk for it and the activation checkpoints
    all_names = layer_names[None] + [name for i in range(num_layers) for name in layer_names[i]]
    info = checkpoint.tensors
    writer = CheckpointWriter(
        config.out, [(n, info[n].dtype, info[n].shape) for n in all_names], config.max_shard_bytes
    )
    needed = disk_needed(state, writer, calibration, stack, dtype, num_layers)
    if offload_dir is not None and calibration is not None:
        offload = {"offloaded activation buffer": run_plan["buffer_bytes"]}
        if same_disk(offload_dir, config.out):
            needed.update(offload)
        else:
            check_free_space(offload_dir, offload)
    check_free_space(config.out, needed)

    # 5. the output directory: new (its state first, so that a run killed at any later instant
    # is resumable), or picked up where the interrupted run's state says
    prepare_output_dir(config.out, config.force)
    state.sessions.append({"from_layer": state.next_layer, "device": str(device)})
    if resuming:
        if state.writer is not None:
            writer.resume(state.writer)
        state.drop_stale()
        if not config.quiet:
            done = f"layers 0-{state.next_layer - 1} of {num_layers} are done, " if state.next_layer else ""
            print(f"resuming the run in {config.out}: {done}continuing from layer {state.next_layer}", file=sys.stderr)
    else:
        state.save()
    if calibration is not None and not (config.out / CALIBRATION_FILE).is_file():
        write_atomic(config.out / CALIBRATION_FILE, calibration_json(calibration))
    earlier_seconds = state.seconds
    layer_log = list(state.layers)  # per-layer sparsity and seconds; the state gets copies
    # the activation buffer [nsamples, seqlen, hidden]: in RAM, or in a file with --offload disk
    hidden = None
    if calibration is not None and state.next_layer < num_layers:
        hidden = buffers.activation_buffer((config.nsamples, seqlen, stack.config.hidden_size), dtype, offload_dir)

    def save_checkpoint(next_layer: int, layers_done: list, with_activations: bool = True) -> None:
        # shard bytes, then activations, then the state naming both: every step durable before the
        # next. Runs on the `saves` thread, in order after the writes it covers.
        position = writer.position()
        activations = None
        if with_activations and hidden is not None and next_layer < num_layers:
            activations = state.save_activations(hidden, next_layer)
        state.writer, state.activations, state.next_layer = position, activations, next_layer
        state.layers = layers_done
        state.seconds = earlier_seconds + time.perf_counter() - started
        state.save()
        state.drop_stale()

    # Background threads: `reads` fetches layer i+1's tensors while layer i computes; `saves`
    # writes layer i's pruned tensors and its resume point while layer i+1 reads and computes its
    # statistics (which only read the buffer). The buffer is next written in 8e, after `saves` is waited on.
    reads, saves = Worker("streamprune-read", config.overlap), Worker("streamprune-save", config.overlap)
    pin = device.type == "cuda"

    def read_layer(index: int) -> dict[str, torch.Tensor]:
        return {local: checkpoint.read(name, pin=pin) for name, local in layer_names[index].items()}

    try:
        with StopOnInterrupt() as stop:
            # 6. tensors outside the decoder layers are copied unchanged (first session only)
            if state.writer is None:
                for name in layer_names[None]:
                    tensor = checkpoint.read(name)
                    check_weights_finite(tensor, name, resume_point(config.out, 0))
                    writer.write(name, tensor)
                    del tensor
                save_checkpoint(0, [], with_activations=False)  # the buffer is not filled yet

            # 7. the inputs of the first layer to do: embedded calibration tokens, or a checkpoint
            if hidden is not None:
                if state.activations is not None:
                    state.load_activations(out=hidden)
                else:
                    embed(checkpoint, calibration["input_ids"], dtype, out=hidden)

            # 8. one decoder layer at a time
            last_saved, last_saved_at = state.next_layer, time.perf_counter()
            progress = tqdm(
                range(state.next_layer, num_layers),
                desc="pruning",
                unit="layer",
                initial=state.next_layer,
                total=num_layers,
                disable=config.quiet,
                dynamic_ncols=True,
            )
            next_read = reads.submit(read_layer, state.next_layer) if state.next_layer < num_layers else None
            for index in progress:
                if stop.requested:
                    saves.wait()
                    stop.check(state.next_layer, num_layers, config.out)
                layer_started = time.perf_counter()
                names = layer_names[index]  # checkpoint name -> name inside the layer module
                # 8a. this layer's tensors (read in the background), in their stored dtype; start
                # reading the next layer's
                stored = next_read.result()
                if config.overlap and index + 1 < num_layers:
                    next_read = reads.submit(read_layer, index + 1)
                for name, local in names.items():
                    check_weights_finite(stored[local], name, resume_point(config.out, last_saved))
                layer = stack.build(index, stored)
                # 8b. Wanda: one forward of the dense layer collects ||X_j||^2 for every Linear
                sq_norms = None
                if hidden is not None:
                    if config.propagate == "dense":
                        saves.wait()  # this forward writes the buffer the last resume point is saving
                    sq_norms = forward_all(
                        stack,
                        layer,
                        index,
                        hidden,
                        config.batch_size,
                        collect=True,
                        write_back=config.propagate == "dense",
                    )
                # 8c. all seven Linears pruned together, from the dense statistics. Where the layer
                # computes on the CPU in the stored dtype, each pruned weight is the tensor to write
                # and replaces the read one (freed here); elsewhere 8d applies the masks to the read
                # tensors.
                masks = {}
                for local in PRUNABLE_LINEARS:
                    module, key = layer.get_submodule(local), local + ".weight"
                    mask = prune_mask(
                        module.weight,
                        config.method,
                        config.sparsity,
                        config.keep_block(),
                        None if sq_norms is None else sq_norms[local],
                    )
                    module.weight.data = apply_mask(module.weight.data, mask)
                    if module.weight.device.type == "cpu" and module.weight.dtype == stored[key].dtype:
                        stored[key] = module.weight.data
                    else:
                        masks[key] = mask.cpu()
                # 8d. the pruned layer in its original dtype, zeros as +0.0, to the `saves` thread;
                # waiting first bounds what is in flight there to one layer (waiting before 8c
                # instead saves that layer's RAM during the masks but, with a resume point per
                # layer, cost 10% of SmolLM2's wall time: benchmarks/walltime.py)
                saves.wait()
                zeros = total = 0
                for name, local in names.items():
                    tensor = stored[local]
                    if local in masks:
                        tensor = apply_mask(tensor, masks[local])
                    if local.removesuffix(".weight") in PRUNABLE_LINEARS:
                        zeros += int((tensor == 0).sum())
                        total += tensor.numel()
                    saves.submit(writer.write, name, tensor)
                # 8e. the next layer's inputs: outputs of the pruned layer (the default)
                if hidden is not None and config.propagate == "pruned":
                    forward_all(stack, layer, index, hidden, config.batch_size, collect=False, write_back=True)
                del layer, stored, masks, tensor, module, mask
                if not config.overlap and index + 1 < num_layers:  # serial: one layer read at a time
                    next_read = reads.submit(read_layer, index + 1)
                if hidden is not None:
                    check_activations_finite(hidden, index, resume_point(config.out, last_saved))
                if observe is not None and hidden is not None:
                    observe(index, hidden)
                seconds = time.perf_counter() - layer_started
                layer_log.append({"layer": index, "sparsity": zeros / total, "seconds": seconds})
                # 8f. a resume point: every --checkpoint-every layers or --checkpoint-minutes, at the
                # last layer, and when Ctrl-C asked to stop
                due = index + 1 - last_saved >= config.checkpoint_every or (
                    config.checkpoint_minutes is not None
                    and time.perf_counter() - last_saved_at >= 60 * config.checkpoint_minutes
                )
                if due or index + 1 == num_layers or stop.requested:
                    saves.submit(save_checkpoint, index + 1, list(layer_log))
                    last_saved, last_saved_at = index + 1, time.perf_counter()
            progress.close()
            saves.wait()
            hidden = None  # an offloaded buffer's file is deleted with it, before the state dir goes

        # 9. finish: the index, then config and tokenizer, then the record; then the state goes
        writer.finish()
    except BaseException as err:
        lost = saves.close()
        if lost is not None and lost is not err:
            err.add_note(f"A background write had failed too, so the last resume point may be older: {lost!r}")
        writer.abort()
        raise
    finally:
        reads.close()
        saves.close()
    copy_support_files(source_dir, config.out)
    record = run_record(
        config,
        source_dir,
        family.architecture,
        num_layers,
        dtype,
        seqlen,
        calibration,
        state,
        writer.files,
        earlier_seconds + time.perf_counter() - started,
    )
    record["plan"] = {key: value for key, value in run_plan.items() if key != "peak_ram_parts"}
    record["offload"] = config.offload
    write_atomic(config.out / RECORD_FILE, (json.dumps(record, indent=2) + "\n").encode())
    state.remove()
    return record


class StopOnInterrupt:
    """Ctrl-C asks the layer loop to stop at its next resume point rather than at once; a second
    Ctrl-C stops at once (the work since the last resume point is then redone on resume)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping once the current layer is saved (press Ctrl-C again to stop at once)", file=sys.stderr
        )

    def check(self, next_layer: int, num_layers: int, out: Path) -> None:
        if self.requested:
            done = f"layers 0-{next_layer - 1} of {num_layers} are saved" if next_layer else "no layer is done yet"
            raise Interrupted(
                f"interrupted: {done} in {out}. Run the same command again to resume from layer {next_layer}."
            )


def plan_run(config: PruneConfig, checkpoint: Checkpoint, dtype: torch.dtype, seqlen: int) -> tuple[dict, Path | None]:
    """Log the plan; refuse (ResourceError) a run that would not fit. Settles config.offload and
    config.batch_size; returns the plan and the directory for the offloaded buffer (or None)."""
    device = config.torch_device
    geometry = plan.Geometry.from_config(checkpoint.config)
    layer_dtype = checkpoint.tensors[f"{LAYER_PREFIX.format(index=0)}{PRUNABLE_LINEARS[0]}.weight"].torch_dtype
    settings = plan.Settings(
        method=config.method,
        pattern=config.pattern,
        nsamples=config.nsamples,
        seqlen=seqlen,
        batch_size=config.batch_size or 1,
        stored_bytes=layer_dtype.itemsize,
        compute_bytes=dtype.itemsize,
        device=device.type,
        offload=config.offload,
        overlap=config.overlap,
        checkpoint_every=config.checkpoint_every,
        runtime_bytes=plan.current_rss_bytes(),
    )
    default_ram, default_vram = plan.default_limits(settings.runtime_bytes, device)
    max_ram = default_ram if config.max_ram_bytes is None else config.max_ram_bytes
    max_vram = default_vram if config.max_gpu_bytes is None else config.max_gpu_bytes
    if config.batch_size is None:
        config.batch_size = settings.batch_size = plan.largest_batch(geometry, settings, max_vram)
    estimate, problems = plan.fit(geometry, settings, max_ram, max_vram)
    config.offload = settings.offload
    if not config.quiet or problems:
        print(plan.report(estimate, settings, None, str(device), problems), file=sys.stderr)
    if problems:
        raise ResourceError(
            "this run would not fit: " + "; ".join(problems) + ". Nothing was written. "
            "See the whole plan with: "
            + shlex.join(
                ["streamprune", "plan", config.model, "--method", config.method, "--nsamples", str(config.nsamples)]
                + ["--seqlen", str(config.seqlen), "--batch-size", str(config.batch_size), "--dtype", config.dtype]
                + [
                    "--device",
                    str(device),
                    "--offload",
                    config.offload,
                    "--checkpoint-every",
                    str(config.checkpoint_every),
                ]
                + (["--max-ram", config.max_ram] if config.max_ram else [])
                + (["--max-gpu-memory", config.max_gpu_memory] if config.max_gpu_memory else [])
            )
        )
    offload_dir = None
    if config.offload == "disk":
        offload_dir = (
            Path(config.offload_dir).expanduser() if config.offload_dir else config.out / STATE_DIR / OFFLOAD_DIR
        )
    return estimate, offload_dir


def check_weights_finite(tensor: torch.Tensor, name: str, saved: str = "") -> None:
    """Refuse a source tensor holding NaN or Inf: everything computed from it would be broken.
    `saved` says what the run has kept."""
    nan, inf = nonfinite_counts(tensor)
    if nan or inf:
        raise BadInputError(
            f"the source checkpoint is broken: tensor {name!r} holds {nan:,} NaN and {inf:,} Inf values, so "
            f"anything computed from it would be broken too; stopped before using it. {saved}".strip()
        )


def check_activations_finite(hidden: torch.Tensor, index: int, saved: str) -> None:
    """Refuse to go on when a layer's outputs overflowed: later layers, and their Wanda statistics,
    would be computed from NaN."""
    nan = inf = 0
    rows = max(1, _FINITE_CHECK_ELEMENTS // max(1, hidden[0].numel()))
    for start in range(0, hidden.shape[0], rows):  # in slices, so that an offloaded buffer stays unmapped
        counts = nonfinite_counts(hidden[start : start + rows])
        nan, inf = nan + counts[0], inf + counts[1]
        buffers.release(hidden, slice(start, start + rows))
    if nan or inf:
        hint = (
            "The weights are finite, so the layer overflowed: rerun with --dtype float32."
            if hidden.dtype != torch.float32
            else "The weights are finite but overflow even in float32: the checkpoint is broken."
        )
        raise BadInputError(
            f"the outputs of layer {index} hold {nan:,} NaN and {inf:,} Inf values (in "
            f"{str(hidden.dtype).removeprefix('torch.')}); stopped before pruning layer {index + 1}. {hint} {saved}"
        )


def same_disk(a: Path, b: Path) -> bool:
    """Whether two paths (or their nearest existing parents) are on the same file system."""

    def device_of(path: Path) -> int:
        path = path.resolve()
        while not path.exists():
            path = path.parent
        return path.stat().st_dev

    return device_of(a) == device_of(b)


def nonfinite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a floating-point tensor; (0, 0) for any other dtype. Looked at in
    slices, so that the boolean temporaries stay small for a buffer of many GB."""
    if not tensor.is_floating_point():
        return 0, 0
    nan = inf = 0
    for part in tensor.reshape(-1).split(_FINITE_CHECK_ELEMENTS):
        if not bool(torch.isfinite(part).all()):
            nan, inf = nan + int(torch.isnan(part).sum()), inf + int(torch.isinf(part).sum())
    return nan, inf


def resume_point(out: Path, next_layer: int) -> str:
    if next_layer == 0:
        return f"No layer was saved in {out}."
    return f"Layers 0-{next_layer - 1} are saved in {out} with the run state (its last resume point)."


def check_not_source(out: Path, source_dir: Path) -> None:
    """Refuse an --out that is, or is inside, the source: the source is only ever read."""
    out_resolved, source_resolved = out.resolve(), source_dir.resolve()
    if out_resolved == source_resolved or source_resolved in out_resolved.parents:
        where = "the source directory" if out_resolved == source_resolved else "inside the source directory"
        raise UsageError(
            f"--out {out} is {where} {source_dir}; streamprune never writes into the source. "
            f"Choose another --out, e.g. --out {source_dir.name}-pruned"
        )


def check_output_dir(out: Path, force: bool) -> None:
    """For a new run: refuse a file, and a non-empty directory without --force."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is a file; choose a directory")
    if (out / RECORD_FILE).is_file() and not force:
        raise UsageError(
            f"--out {out} already holds a completed run (see {out / RECORD_FILE}); choose another --out, or "
            "add --force to redo it"
        )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(
            f"--out {out} is not empty; choose an empty or new directory, or add --force to replace the "
            "checkpoint in it"
        )


def prepare_output_dir(out: Path, force: bool) -> None:
    """Create --out; with --force, remove the weights, record and run state of an earlier run
    there, which would otherwise be loaded instead of (or mixed with) the new ones. Nothing else
    is touched."""
    out.mkdir(parents=True, exist_ok=True)
    if force:
        stale = [out / SINGLE_FILE, out / INDEX_FILE, out / RECORD_FILE, out / CALIBRATION_FILE]
        stale += [*out.glob("model-*-of-*.safetensors"), *out.glob(".*.partial")]
        for path in stale:
            if path.is_file():
                path.unlink()
        if (out / STATE_DIR).is_symlink():  # remove the link, never what it points at
            (out / STATE_DIR).unlink()
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def run_structure(
    config: PruneConfig, checkpoint: Checkpoint, dtype: torch.dtype, seqlen: int, calib_path: Path | None
) -> dict:
    """Every setting that shapes the output bytes: a run may only be resumed with the same ones."""
    wanda = calib_path is not None
    return {
        "source": source_fingerprint(checkpoint),
        "method": config.method,
        "sparsity": config.sparsity,
        "pattern": config.pattern,
        "propagate": config.propagate if wanda else None,
        "calibration": {"file": calib_path.name, "sha256": file_sha256(calib_path)} if wanda else None,
        "nsamples": config.nsamples if wanda else None,
        "seqlen": seqlen if wanda else None,
        "seed": config.seed if wanda else None,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": config.batch_size if wanda else None,
        "max_shard_bytes": config.max_shard_bytes,
    }


def disk_needed(
    state: RunState, writer: CheckpointWriter, calibration: dict | None, stack: LayerStack, dtype, num_layers: int
) -> dict[str, int]:
    """Bytes still to be written: the rest of the checkpoint, and room for two activation
    checkpoints (the next one is complete before the previous one is deleted)."""
    written = 0
    if state.writer is not None:
        written = sum(seal["bytes"] for seal in state.writer["sealed"].values())
        written += (state.writer["partial"] or {}).get("bytes", 0)
    needed = {"output checkpoint": writer.total_bytes - written, "activation checkpoints": 0}
    if calibration is not None and state.next_layer < num_layers - 1:
        ids = calibration["input_ids"]
        buffer_bytes = ids.numel() * stack.config.hidden_size * dtype.itemsize
        needed["activation checkpoints"] = 2 * buffer_bytes - (buffer_bytes if state.activations else 0)
    return needed


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
            _check_float(checkpoint.tensors[full])
    required = [EMBEDDING, "model.norm.weight"]
    if not getattr(stack.config, "tie_word_embeddings", False):
        required.append("lm_head.weight")
    for name in required:
        if name not in checkpoint.tensors:
            raise BadInputError(f"the checkpoint has no tensor {name!r}; it is incomplete")
        _check_float(checkpoint.tensors[name])
    width = stack.config.hidden_size
    embedding = checkpoint.tensors[EMBEDDING].shape
    if len(embedding) != 2 or embedding[1] != width:
        raise BadInputError(
            f"tensor {EMBEDDING!r} has shape {list(embedding)}, but config.json implies [vocab, {width}]"
        )
    return groups


def _check_float(info) -> None:
    if info.torch_dtype not in DTYPES.values():
        raise BadInputError(
            f"tensor {info.name!r} in {info.file.name} is stored as {info.dtype}; streamprune prunes float32, "
            "bfloat16 and float16 checkpoints, not quantized or integer ones"
        )


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


def calibration_path(config: PruneConfig) -> Path:
    path = fetch_c4() if config.calib == "c4" else Path(config.calib).expanduser()
    if not path.is_file():
        raise BadInputError(f"--calib {config.calib}: no such file; pass a .txt, .jsonl or .jsonl.gz file, or c4")
    return path


def sample_calibration(config: PruneConfig, path: Path, sha256: str, source_dir: Path, seqlen: int) -> dict:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir)
    except Exception as err:
        raise BadInputError(f"cannot load the tokenizer from {source_dir}: {err}") from err
    documents = read_documents(path)
    input_ids = sample_windows(documents, tokenizer, config.nsamples, seqlen, config.seed)
    return {
        "source": config.calib if config.calib == "c4" else str(path),
        "file": str(path),
        "sha256": sha256,
        "documents": len(documents),
        "nsamples": config.nsamples,
        "seqlen": seqlen,
        "seed": config.seed,
        "input_ids": input_ids,
    }


def calibration_json(calibration: dict) -> bytes:
    ids = {key: value for key, value in calibration.items() if key != "input_ids"}
    ids["input_ids"] = calibration["input_ids"].tolist()
    return json.dumps(ids).encode()


def load_saved_calibration(out: Path, nsamples: int, seqlen: int) -> dict:
    """The calibration ids an interrupted run saved: resuming must not depend on resampling."""
    path = out / CALIBRATION_FILE
    try:
        calibration = json.loads(path.read_text())
        calibration["input_ids"] = torch.tensor(calibration["input_ids"], dtype=torch.int64)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInputError(
            f"cannot read {path}, the calibration ids of the interrupted run ({err}); start over with --force"
        ) from err
    if tuple(calibration["input_ids"].shape) != (nsamples, seqlen):
        raise BadInputError(f"{path} does not hold {nsamples} x {seqlen} token ids; start over with --force")
    return calibration


def embed(
    checkpoint: Checkpoint, input_ids: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The calibration tokens' embeddings, [nsamples, seqlen, hidden] on the CPU (into `out` if given).

    The embedding matrix (2 GB for Llama-3-70B) is read in slices of rows, and each slice fills
    the tokens that fall in it, a bounded run of tokens at a time: neither the whole matrix nor a
    second buffer-sized temporary is ever in memory.
    """
    info = checkpoint.tensors[EMBEDDING]
    vocab, width = info.shape
    hidden = torch.empty(*input_ids.shape, width, dtype=dtype) if out is None else out
    flat_ids, flat_hidden = input_ids.reshape(-1), hidden.view(-1, width)  # [tokens], [tokens, width]
    rows_per_slice = max(1, buffers.EMBEDDING_SLICE_BYTES // max(1, info.nbytes // vocab))
    tokens_per_copy = max(1, buffers.EMBEDDING_SLICE_BYTES // (width * hidden.element_size()))
    if buffers.is_offloaded(hidden):  # a run's rows lie all over the buffer: touch few pages at a time
        tokens_per_copy = min(tokens_per_copy, buffers.OFFLOADED_TOKENS_PER_COPY)
    for first in range(0, vocab, rows_per_slice):
        positions = ((flat_ids >= first) & (flat_ids < first + rows_per_slice)).nonzero().squeeze(1)
        if positions.numel():
            table = checkpoint.read(EMBEDDING, rows=slice(first, first + rows_per_slice)).to(dtype)
            for run in positions.split(tokens_per_copy):
                flat_hidden[run] = table[flat_ids[run] - first]
                buffers.release(hidden)
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
            buffers.release(hidden, slice(start, start + batch_size))
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


def run_record(config, source_dir, architecture, num_layers, dtype, seqlen, calibration, state, files, seconds) -> dict:
    import transformers

    device = config.torch_device
    layers = state.layers
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
        "mean_layer_sparsity": sum(layer["sparsity"] for layer in layers) / max(1, len(layers)),
        "calibration": None,
        "layers": layers,
        "output_files": files,
        "sessions": state.sessions,  # more than one: the run was resumed
        "total_seconds": seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_vram_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    if calibration is not None:
        record["calibration"] = {k: v for k, v in calibration.items() if k != "input_ids"}
        record["calibration"]["ids_file"] = CALIBRATION_FILE
        if seqlen != config.seqlen:
            record["calibration"]["seqlen_capped_from"] = config.seqlen
    return record
