"""Steps 1-6 of a run: every check before the first write, then the output directory. Each step
takes what the earlier ones returned and returns its own result; none writes to the config."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch

from ..calibration import (
    CALIBRATION_FILE,
    calibration_json,
    calibration_path,
    file_sha256,
    load_saved_calibration,
    sample_calibration,
)
from ..config import PruneConfig
from ..distributed import Peers
from ..errors import ResourceError, UsageError
from ..outdir import (
    OutputLock,
    check_destination,
    check_not_source,
    check_output_dir,
    prepare_output_dir,
    same_disk,
    support_bytes,
)
from ..plan import memory as plan
from ..plan.geometry import Geometry
from ..plan.report import report
from ..runstate import OFFLOAD_DIR, STATE_DIR, RunState, check_free_space, saved_state, source_fingerprint
from ..stream import open_source
from ..writer import CheckpointWriter, write_atomic
from .context import Job, Resolved


def check_source(config: PruneConfig, peers: Peers, device: torch.device, lock: OutputLock) -> Job:
    """1. The source opened and checked against the settings; nothing is written until every check
    has passed."""
    out, resources = config.output.out, config.resources
    method = config.method.build()
    source = open_source(config.model, device, resources.dtype)
    check_not_source(out, source.directory)
    if peers.leader:  # the leader's lock, taken in 6, is not another command's
        lock.check()
    check_destination(out, "--out")
    if resources.offload_dir is not None:
        check_not_source(Path(resources.offload_dir).expanduser(), source.directory, "--offload-dir")
        check_destination(Path(resources.offload_dir), "--offload-dir")
    check_pattern_fits(config, source)
    streams = method.needs_calibration or config.reconstruction.enabled
    calibrated = streams or config.method.allocation_settings() is not None
    calib_path = calibration_path(config.calibration.calib) if calibrated else None
    if not peers.alone:
        check_distributed(config, peers)
        if not streams and peers.leader:
            peers = Peers()  # nothing to share: the leader runs alone, the others stop
    seqlen = source.capped_seqlen(config.calibration.seqlen)
    return Job(config, peers, device, method, source, seqlen, calib_path)


def check_plan(job: Job) -> Resolved:
    """2. The plan: what the run will hold at its peaks, against the RAM and GPU memory it may use.
    --offload auto, --batch-size auto and --expert-weights auto are decided here (a resumed run
    keeps what it chose); a run that cannot fit stops now."""
    config, peers, source = job.config, job.peers, job.source
    batch_size, expert_weights = saved_choices(config)
    settings = plan_settings(job, batch_size, expert_weights)
    default_ram, default_vram = plan.default_limits(settings.runtime_bytes, job.device)
    max_ram = default_ram if config.resources.max_ram_bytes is None else config.resources.max_ram_bytes
    max_vram = default_vram if config.resources.max_gpu_bytes is None else config.resources.max_gpu_bytes
    geometry = Geometry.from_config(source.checkpoint.config)
    if batch_size is None:
        batch_size = settings.batch_size = plan.largest_batch(geometry, settings, max_vram)
    if peers.alone:
        run_plan, problems = plan.fit(geometry, settings, max_ram, max_vram)
    else:  # this process's share (all of them on this machine's RAM), the leader's writes
        run_plan, problems = plan.shared(geometry, settings, peers.world_size, max_ram, max_vram)
    if run_plan["experts_in_ram"]:
        use_experts_in_ram(job)
    # the leader's choices: they shape the result (and the resume points), and it owns those
    batch_size, checkpoint_every = peers.broadcast_object((batch_size, run_plan["checkpoint_every"]))
    offload_dir = None
    if settings.offload == "disk":
        offload_dir = config.resources.offload_dir
        offload_dir = Path(offload_dir).expanduser() if offload_dir else job.out / STATE_DIR / OFFLOAD_DIR
    resolved = Resolved(run_plan, batch_size, settings.offload, settings.expert_weights, checkpoint_every, offload_dir)
    if not job.quiet or problems:
        print(report(run_plan, settings, None, str(job.device), problems), file=sys.stderr)
    if problems:
        raise ResourceError(
            "this run would not fit: " + "; ".join(problems) + ". Nothing was written. "
            "See the whole plan with: " + plan_command(config, resolved)
        )
    return resolved


def saved_choices(config: PruneConfig) -> tuple[int | None, str]:
    """--batch-size and --expert-weights, where an unfinished run in --out settled an auto one."""
    batch_size, expert_weights = config.calibration.batch_size, config.resources.expert_weights
    auto = batch_size is None or expert_weights == "auto"
    if auto and RunState.exists(config.output.out) and not config.output.force:
        saved = RunState.load(config.output.out).structure
        if batch_size is None:
            batch_size = saved.get("batch_size")
        if expert_weights == "auto":
            expert_weights = saved.get("expert_weights") or "auto"
    return batch_size, expert_weights


def plan_settings(job: Job, batch_size: int | None, expert_weights: str) -> plan.Settings:
    """The plan's view of this run."""
    config, source = job.config, job.source
    first_linear = job.projections.names[0]
    probe = source.checkpoint.tensors[f"{source.names.layer(0)}{first_linear}.weight"]
    return plan.Settings(
        method=config.method.method,
        method_options=config.method.options(),
        allocation=config.method.allocation,
        sequential=config.method.sequential,
        reconstruct=config.reconstruction.settings(),
        pattern=config.method.pattern,
        nsamples=config.calibration.nsamples,
        seqlen=job.seqlen,
        batch_size=batch_size or 1,
        stored_bytes=probe.torch_dtype.itemsize,
        compute_bytes=source.dtype.itemsize,
        device=job.device.type,
        offload=config.resources.offload,
        expert_weights=expert_weights,
        overlap=config.resources.overlap,
        checkpoint_every=config.output.checkpoint_every,
        runtime_bytes=plan.current_rss_bytes(),
    )


def use_experts_in_ram(job: Job) -> None:
    """--expert-weights cpu (asked, or the plan's choice for a layer larger than the GPU): every
    layer is built with its routed experts in RAM; each visits the GPU while it computes."""
    if job.config.reconstruction.enabled:
        raise ResourceError(
            "a layer of this model does not fit the GPU with its experts on it, and --reconstruct trains the "
            "whole layer there. Drop --reconstruct, or use a GPU with more memory. Nothing was written."
        )
    job.source.runner.expert_device = torch.device("cpu")


def open_state(job: Job, resolved: Resolved) -> tuple[RunState, bool, bytes | None]:
    """3. A new run, or the unfinished one in --out (same settings only): the state, whether it
    resumes, and the state file's bytes as read (step 6 checks that nobody changed them). The leader's: the others learn from it where the run stands (the layer to start from,
    and whether its inputs are saved or are the embeddings)."""
    config, peers = job.config, job.peers
    if not peers.leader:
        state = RunState(job.out, {})  # never saved: a copy of the leader's position
        state.next_layer, state.activations = peers.broadcast_object(None)
        return state, False, None
    identity = run_identity(job, resolved)
    resuming = RunState.exists(job.out) and not config.output.force
    state_bytes = None
    if resuming:
        state = RunState.load(job.out)
        state.check_same_run(identity, job.out)
        state_bytes = saved_state(job.out)
    else:
        check_output_dir(job.out, config.output.force)
        state = RunState(job.out, identity)
    # every tensor read is hashed: one that differs from what an earlier session read is refused
    job.source.checkpoint.digests = state.tensor_digests
    peers.broadcast_object((state.next_layer, state.activations))
    return state, resuming, state_bytes


def run_identity(job: Job, resolved: Resolved) -> dict:
    """Every setting that shapes the output bytes: a run may only be resumed with the same ones."""
    config, method, source = job.config, job.method, job.source
    calibrated, on_gpu = job.calib_path is not None, job.device.type == "cuda"
    settings = config.reconstruction.settings()
    return {
        "source": source_fingerprint(source.checkpoint),
        "method": method.name,
        **method.settings(),
        "sparsity": config.method.sparsity,
        "pattern": config.method.pattern,
        "allocation": config.method.allocation_settings(),
        "sequential": config.method.sequential if method.needs_calibration else None,
        "reconstruct": settings.as_record() if settings is not None else None,
        "propagate": config.calibration.propagate if calibrated else None,
        "calibration": {"file": job.calib_path.name, "sha256": file_sha256(job.calib_path)} if calibrated else None,
        "nsamples": config.calibration.nsamples if calibrated else None,
        "seqlen": job.seqlen if calibrated else None,
        "seed": config.calibration.seed if calibrated else None,
        "dtype": str(source.dtype).removeprefix("torch."),
        "batch_size": resolved.batch_size if calibrated else None,
        # where the experts' statistics and pruning ran (CPU or GPU arithmetic): only a GPU MoE run's
        "expert_weights": resolved.expert_weights if source.runner.experts and on_gpu else None,
        "max_shard_bytes": config.output.max_shard_bytes,
    }


def load_calibration(job: Job, state: RunState, resuming: bool) -> dict | None:
    """4. The token windows (methods that need calibration data): the leader's, shared."""
    if job.calib_path is None:
        return None
    config, peers = job.config, job.peers
    if not peers.leader:
        return {"input_ids": peers.broadcast_object(None)}
    if resuming and (job.out / CALIBRATION_FILE).is_file():
        calibration = load_saved_calibration(job.out, config.calibration.nsamples, job.seqlen)
    else:
        sha256 = state.structure["calibration"]["sha256"]
        calibration = sample_calibration(config.calibration, job.calib_path, sha256, job.source.directory, job.seqlen)
    job.source.check_token_ids(calibration["input_ids"])
    peers.broadcast_object(calibration["input_ids"])
    return calibration


def check_disk(job: Job, resolved: Resolved, state: RunState, calibration: dict | None) -> CheckpointWriter | None:
    """5. The planned shard layout, and room on the disk for it and the resume points' activations
    (the leader's: it alone writes)."""
    if not job.peers.leader:
        return None
    source = job.source
    names = source.layer_names
    all_names = names[None] + [name for i in range(source.num_layers) for name in names[i]]
    info = source.checkpoint.tensors
    writer = CheckpointWriter(
        job.out, [(n, info[n].dtype, info[n].shape) for n in all_names], job.config.output.max_shard_bytes
    )
    needed = disk_needed(job, state, writer, calibration)
    if resolved.offload_dir is not None and calibration is not None:
        offload = {"offloaded activation buffer": resolved.plan["buffer_bytes"]}
        if same_disk(resolved.offload_dir, job.out):
            needed.update(offload)
        else:
            check_free_space(resolved.offload_dir, offload)
    check_free_space(job.out, needed)
    return writer


def disk_needed(job: Job, state: RunState, writer: CheckpointWriter, calibration: dict | None) -> dict[str, int]:
    """Bytes still to be written: the rest of the checkpoint, and room for two activation files
    (the next resume point's is complete before the previous one's is deleted)."""
    written = 0
    if state.writer is not None:
        written = sum(seal["bytes"] for seal in state.writer["sealed"].values())
        written += (state.writer["partial"] or {}).get("bytes", 0)
    needed = {"output checkpoint": writer.total_bytes - written, "activation checkpoints": 0,
              "config and tokenizer files": support_bytes(job.source.directory)}
    if calibration is not None and state.next_layer < job.source.num_layers - 1:
        buffer_bytes = calibration["input_ids"].numel() * job.source.runner.config.hidden_size
        # and the dense stream's, with --reconstruct
        buffer_bytes *= job.source.dtype.itemsize * (2 if job.config.reconstruction.enabled else 1)
        needed["activation checkpoints"] = 2 * buffer_bytes - (buffer_bytes if state.activations else 0)
    return needed


def prepare_output(job: Job, state: RunState, resuming: bool, state_bytes: bytes | None, writer, calibration,
                   lock: OutputLock) -> None:  # fmt: skip
    """6. --out locked, then new (its state first, so that a run killed at any later instant is
    resumable) or picked up where the interrupted run's state says (the leader's; the others only
    compute). `state_bytes`: the state file as step 3 read it."""
    if not job.peers.leader:
        return
    config, out = job.config, job.out
    lock.acquire()
    # --out as it was checked in 3: another command may have written there since
    if resuming and saved_state(out) != state_bytes:
        raise UsageError(
            f"--out {out}: the unfinished run there changed while this command was starting (another "
            f"streamprune process?). Nothing was written; run the same command again"
        )
    if not resuming:
        check_output_dir(out, config.output.force)
    prepare_output_dir(out, config.output.force)
    record_session(job, state, resuming)
    if resuming:
        if state.writer is not None:
            writer.resume(state.writer)
        state.drop_stale()
        if not job.quiet:
            done = f"layers 0-{state.next_layer - 1} of {job.source.num_layers} are done, " if state.next_layer else ""
            print(f"resuming the run in {out}: {done}continuing from layer {state.next_layer}", file=sys.stderr)
    else:
        state.save()
    if calibration is not None and not (out / CALIBRATION_FILE).is_file():
        write_atomic(out / CALIBRATION_FILE, calibration_json(calibration))


def record_session(job: Job, state: RunState, resuming: bool) -> None:
    """This start in the state's list of sessions; a resume by another number of processes says
    what that changes."""
    peers = job.peers
    before = state.sessions[-1].get("processes", 1) if state.sessions else peers.world_size
    session = {"from_layer": state.next_layer, "device": str(job.device)}
    state.sessions.append(session if peers.alone else {**session, "processes": peers.world_size})
    if resuming and before != peers.world_size and not job.quiet:
        print(f"the last attempt ran {before} process(es), this one {peers.world_size}: the layers from "
              f"{state.next_layer} on merge their statistics over the new shares (exact for Wanda and RIA; "
              "SparseGPT's Hessians round differently: see the README)", file=sys.stderr)  # fmt: skip


def plan_command(config: PruneConfig, resolved: Resolved) -> str:
    """The `streamprune plan` command that shows a run's whole plan."""
    method, resources = config.method, config.resources
    words = ["streamprune", "plan", config.model, "--method", method.method]
    words += ["--nsamples", str(config.calibration.nsamples)]
    for option, value in method.options().items():
        words += [f"--{option}", str(value)] if value is not None else []
    words += ["--allocation", method.allocation] if method.allocation != "uniform" else []
    words += ["--sequential"] if method.sequential else []
    words += ["--seqlen", str(config.calibration.seqlen), "--batch-size", str(resolved.batch_size)]
    words += ["--dtype", resources.dtype, "--device", str(resources.torch_device), "--offload", resolved.offload]
    words += ["--checkpoint-every", str(resolved.checkpoint_every)] if resolved.checkpoint_every else []
    words += ["--max-ram", resources.max_ram] if resources.max_ram else []
    words += ["--max-gpu-memory", resources.max_gpu_memory] if resources.max_gpu_memory else []
    return shlex.join(words)


def check_distributed(config: PruneConfig, peers: Peers) -> None:
    """What several processes cannot do together (yet): refused before anything is written."""
    one = "run it in one process (without torchrun, or --nproc-per-node 1)"
    if config.reconstruction.enabled:
        raise UsageError(f"--reconstruct trains each layer in one process: {one}")
    if config.method.allocation_settings() is not None:
        raise UsageError(f"--allocation {config.method.allocation}'s outlier pass runs in one process: {one}")
    if config.calibration.nsamples < peers.world_size:
        raise UsageError(
            f"--nsamples {config.calibration.nsamples} cannot be shared by {peers.world_size} processes (each needs "
            f"at least one calibration sample): raise --nsamples or start fewer processes"
        )


def check_pattern_fits(config: PruneConfig, source) -> None:
    block = config.method.keep_block()
    if block is None:
        return
    layer = source.runner.skeleton(0)
    for local in source.runner.projections.names:
        width = layer.get_submodule(local).in_features
        if width % block[1]:
            raise UsageError(
                f"--pattern {config.method.pattern}: M={block[1]} does not divide the input width {width} of {local}; "
                "choose an M that divides every Linear's input width (4 and 8 do for all supported models)"
            )
