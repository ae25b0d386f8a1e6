"""`streamprune width`: the settings checked against the source, then one decoder layer at a time:
read, score (from the calibration stream for flap and wanda-sp), cut to the kept heads and
channels, compensate (flap), write, and a resume point; then the narrowed config.json and the record.

flap's next-layer inputs are the dense layer's outputs, as the published code propagates
(`inps, outs = outs, inps`: statistics of the whole dense model); wanda-sp's are the narrowed
layer's, as its published code runs the compressed layer again."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import buffers
from ..calibration import (
    CALIBRATION_FILE,
    calibration_json,
    calibration_path,
    file_sha256,
    load_saved_calibration,
    sample_calibration,
)
from ..errors import ResourceError, UsageError
from ..families import LayerRunner, text_config
from ..outdir import (
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
from ..pipeline.resume import IN_FLOAT32, StopOnInterrupt, resume_point
from ..plan import memory
from ..plan.geometry import Geometry as PlanGeometry
from ..runstate import RunState, check_free_space, saved_state, source_fingerprint
from ..sizes import format_size
from ..stream import LayerReader, Source, check_activations_finite, check_weights_finite, open_source
from ..writer import CheckpointWriter, write_atomic
from .config import WidthConfig
from .layer import narrow_layer
from .record import width_record
from .scores import CALIBRATED
from .shapes import Cut, Geometry, choose_cut, compensable, narrowed_config, shapes


@dataclass(frozen=True)
class WidthPlan:
    """What the command decided before the first write."""

    geometry: Geometry
    cut: Cut
    attention_share: float
    compensate: dict[str, bool]  # site (attention, mlp) -> whether its output Linear gets FLAP's bias
    config: dict  # the narrowed config.json
    runner: LayerRunner  # builds and runs the narrowed layers
    new_shapes: dict[str, tuple[int, ...]]  # a narrowed layer's tensors (local names)
    seqlen: int
    calib_path: Path | None


def width(config: WidthConfig) -> dict:
    """Narrow every decoder layer of `config.model` into `config.out`, resuming an interrupted run
    there; returns the record (also written as streamprune.json)."""
    started = time.perf_counter()
    buffers.return_freed_memory_to_the_system()
    source = open_source(config.model, config.torch_device, config.dtype)
    check_not_source(config.out, source.directory)
    with OutputLock(config.out) as lock:  # taken before the first write; released however this ends
        lock.check()
        check_destination(config.out, "--out")
        plan = plan_width(config, source)
        state, calibration, writer = start(config, source, plan, lock)
        layers_through(config, source, plan, state, calibration, writer, started)
        return finish(config, source, plan, state, calibration, writer)


def plan_width(config: WidthConfig, source: Source) -> WidthPlan:
    """The family checked, how much every layer loses, and where FLAP's compensation can go."""
    if source.runner.experts is not None:
        raise UsageError(
            f"streamprune width does not narrow mixture-of-experts models ({source.family.architecture}) yet: "
            "each expert would need its own channel choice under one shared intermediate size. Use "
            "`streamprune depth` to remove whole blocks, or `streamprune run` for unstructured sparsity"
        )
    family, raw = source.family, source.checkpoint.config
    fields = text_config(raw)
    can = compensable(family, fields) if config.criterion == "flap" else {"attention": False, "mlp": False}
    cut, share = choose_cut(family, raw, config.ratio, config.attention_share, can)
    geometry = Geometry.of(fields)
    new_config = narrowed_config(raw, geometry, cut, can)
    runner = LayerRunner(new_config, family, source.runner.device, source.dtype)
    calib_path = calibration_path(config.calib) if config.criterion in CALIBRATED else None
    seqlen = source.capped_seqlen(config.seqlen)
    check_memory(config, source, seqlen)
    return WidthPlan(geometry, cut, share, can, new_config, runner, shapes(runner.skeleton(0)), seqlen, calib_path)


def check_memory(config: WidthConfig, source: Source, seqlen: int) -> None:
    """Refused before anything is written where the peaks do not fit this machine. width holds what
    a Wanda run holds (one layer, the [nsamples, seqlen, hidden] stream in RAM, per-channel
    statistics of each Linear's input), so the run plan's Wanda estimate is its estimate."""
    calibrated = config.criterion in CALIBRATED
    first = f"{source.names.layer(0)}{source.family.projections.names[0]}.weight"
    settings = memory.Settings(
        method="wanda" if calibrated else "magnitude", nsamples=config.nsamples, seqlen=seqlen,
        batch_size=config.batch_size, stored_bytes=source.checkpoint.tensors[first].torch_dtype.itemsize,
        compute_bytes=source.dtype.itemsize, device=source.runner.device.type, offload="cpu", overlap=config.overlap,
        runtime_bytes=memory.current_rss_bytes(),
    )  # fmt: skip
    max_ram, max_vram = memory.default_limits(settings.runtime_bytes, source.runner.device)
    needs = memory.estimate(PlanGeometry.from_config(source.checkpoint.config), settings)
    short = []
    if max_ram is not None and needs["peak_ram_bytes"] > max_ram:
        short.append(f"about {format_size(needs['peak_ram_bytes'])} of RAM, more than the {format_size(max_ram)} "
                     "available")  # fmt: skip
    if max_vram is not None and (needs["peak_vram_bytes"] or 0) > max_vram:
        short.append(f"about {format_size(needs['peak_vram_bytes'])} of GPU memory, more than {format_size(max_vram)}")
    if short:
        raise ResourceError(
            f"this width run would need {' and '.join(short)}: lower --nsamples (now {config.nsamples}) or --seqlen "
            f"(now {seqlen}){', or --batch-size' if max_vram is not None else ''}. Nothing was written."
        )


def identity(config: WidthConfig, source: Source, plan: WidthPlan) -> dict:
    """Every setting that shapes the output bytes: a run may only be resumed with the same ones."""
    calibrated = plan.calib_path is not None
    return {
        "command": "width",
        "source": source_fingerprint(source.checkpoint),
        "criterion": config.criterion,
        "ratio": config.ratio,
        "attention_share": config.attention_share,
        "calibration": {"file": plan.calib_path.name, "sha256": file_sha256(plan.calib_path)} if calibrated else None,
        "nsamples": config.nsamples if calibrated else None,
        "seqlen": plan.seqlen if calibrated else None,
        "seed": config.seed if calibrated else None,
        "dtype": str(source.dtype).removeprefix("torch."),
        "batch_size": config.batch_size if calibrated else None,
        "max_shard_bytes": config.max_shard_bytes,
    }


def start(config: WidthConfig, source: Source, plan: WidthPlan, lock: OutputLock):
    """The state (new, or the unfinished run's in --out), the calibration ids, the planned writer and
    --out prepared; every check passes before the first write."""
    structure, out = identity(config, source, plan), config.out
    resuming = RunState.exists(out) and not config.force
    state_bytes = saved_state(out) if resuming else None
    if resuming:
        state = RunState.load(out)
        state.check_same_run(structure, out)
    else:
        check_output_dir(out, config.force)
        state = RunState(out, structure)
    source.checkpoint.digests = state.tensor_digests  # a source tensor changed since the last session is refused
    calibration = None
    if plan.calib_path is not None:
        if resuming and (out / CALIBRATION_FILE).is_file():
            calibration = load_saved_calibration(out, config.nsamples, plan.seqlen)
        else:
            sha256 = structure["calibration"]["sha256"]
            calibration = sample_calibration(config, plan.calib_path, sha256, source.directory, plan.seqlen)
        source.check_token_ids(calibration["input_ids"])
    writer = CheckpointWriter(out, planned_tensors(source, plan), config.max_shard_bytes)
    check_disk(config, source, state, calibration, writer)
    lock.acquire()
    if resuming and saved_state(out) != state_bytes:
        raise UsageError(f"--out {out}: the unfinished run there changed while this command was starting (another "
                         "streamprune process?). Nothing was written; run the same command again")  # fmt: skip
    prepare_output_dir(out, config.force and not resuming)
    state.sessions.append({"from_layer": state.next_layer, "device": str(source.runner.device)})
    if resuming:
        if state.writer is not None:
            writer.resume(state.writer)
        state.drop_stale()
        if not config.quiet:
            print(f"resuming the width run in {out} from layer {state.next_layer}", file=sys.stderr)
    else:
        state.save()
    if calibration is not None and not (out / CALIBRATION_FILE).is_file():
        write_atomic(out / CALIBRATION_FILE, calibration_json(calibration))
    return state, calibration, writer


def planned_tensors(source: Source, plan: WidthPlan) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every output tensor in write order: the tensors outside the layers as
    they are, then each layer's narrowed ones (new biases in the dtype of the layer's weights)."""
    info, names = source.checkpoint.tensors, source.layer_names
    planned = [(n, info[n].dtype, info[n].shape) for n in names[None]]
    new_shapes, old_shapes = plan.new_shapes, shapes(source.runner.skeleton(0))
    for index in range(source.num_layers):
        prefix = source.names.layer(index)
        kept = {local: info[name] for name, local in names[index].items()}
        weight_dtype = kept[source.runner.projections.names[0] + ".weight"].dtype
        layer = {local: (t.dtype, t.shape) for local, t in kept.items() if local not in old_shapes}  # copied through
        layer.update({local: (kept[local].dtype if local in kept else weight_dtype, shape)
                      for local, shape in new_shapes.items()})  # fmt: skip
        planned += [(prefix + local, *layer[local]) for local in sorted(layer)]
    return planned


def check_disk(config: WidthConfig, source: Source, state: RunState, calibration, writer: CheckpointWriter) -> None:
    written = 0
    if state.writer is not None:
        written = sum(seal["bytes"] for seal in state.writer["sealed"].values())
        written += (state.writer["partial"] or {}).get("bytes", 0)
    needed = {"output checkpoint": writer.total_bytes - written, "activation checkpoints": 0,
              "config and tokenizer files": support_bytes(source.directory)}
    if calibration is not None:  # two activation files: the next one is complete before the last goes
        buffer_bytes = calibration["input_ids"].numel() * source.runner.config.hidden_size * source.dtype.itemsize
        needed["activation checkpoints"] = 2 * buffer_bytes
    check_free_space(config.out, needed)


def layers_through(config, source: Source, plan: WidthPlan, state: RunState, calibration, writer, started) -> None:
    """The tensors outside the layers (first session), then every layer not yet done, a resume point
    after each."""
    hidden = None
    if calibration is not None and state.next_layer < source.num_layers:
        shape = (config.nsamples, plan.seqlen, source.runner.config.hidden_size)
        hidden = buffers.activation_buffer(shape, source.dtype, None)
    earlier = state.seconds
    if state.writer is None:
        for name in source.layer_names[None]:
            tensor = source.checkpoint.read(name)
            check_weights_finite(tensor, name)
            writer.write(name, tensor)
        save_point(state, writer, 0, None, source.num_layers, started, earlier)
    if hidden is not None:
        if state.activations is None:
            source.embed(calibration["input_ids"], out=hidden)
        else:
            state.load_activations(out=hidden)
    reader = LayerReader(source, config.overlap, pin=source.runner.device.type == "cuda")
    try:
        with StopOnInterrupt() as stop:
            for index, stored in reader.layers(list(range(state.next_layer, source.num_layers))):
                saved = resume_point(config.out, state.next_layer)
                source.check_layer_finite(index, stored, saved)
                log = narrow_layer(config, source, plan, index, stored, hidden, writer)
                del stored
                if hidden is not None:
                    check_activations_finite(hidden, index, saved, IN_FLOAT32)
                state.layers.append(log)
                save_point(state, writer, index + 1, hidden, source.num_layers, started, earlier)
                if stop.requested and index + 1 < source.num_layers:
                    raise stop.interrupted(index + 1, source.num_layers, config.out)
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()


def save_point(state: RunState, writer: CheckpointWriter, next_layer: int, hidden, num_layers: int, started: float,
               earlier: float) -> None:  # fmt: skip
    """Shard bytes, then activations, then the state naming both: every step durable before the next
    (as run's resume points). `earlier`: the seconds of earlier sessions."""
    position = writer.position()
    activations = None
    if hidden is not None and next_layer < num_layers:
        activations = state.save_activations(hidden, next_layer)
    state.writer, state.activations, state.next_layer = position, activations, next_layer
    state.seconds = earlier + time.perf_counter() - started
    state.save()
    state.drop_stale()


def finish(config: WidthConfig, source: Source, plan: WidthPlan, state: RunState, calibration, writer) -> dict:
    """Support files and the narrowed config.json, then the index, then the record (a disk that fills
    before the record leaves no output that looks finished); then the state goes."""
    copy_support_files(source.directory, config.out)
    write_json(config.out / "config.json", plan.config)
    writer.finish()
    record = width_record(config, source, plan, state, calibration, writer)  # its seconds: every session's
    write_json(config.out / RECORD_FILE, record)
    state.remove()
    return record
