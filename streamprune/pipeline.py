"""`streamprune run`: prune a checkpoint one decoder layer at a time, never holding the whole model.

`prune(config)` is the library entry point the CLI calls. It builds one `PruneRun` and calls its
steps in order; the run is the only place that touches the device, the disk and the calibration
buffer together. What happens to a layer's weights is the method's business (methods/); reading,
embedding and the micro-batch forward are the layer stream's (stream.py).

Per layer: read (the next one in the background) -> dense forward (the method's statistics) ->
prune (masks or new weights) -> write (in the background) and pruned forward (the next layer's
inputs) -> a resume point every --checkpoint-every layers. The steps that set memory peaks are
named as plan.py names them, and the run records which it took.
"""

from __future__ import annotations

import functools
import platform
import resource
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from . import buffers, plan
from .allocation import layer_outlier_ratio, owl_sparsities
from .background import Worker
from .calibration import (
    CALIBRATION_FILE,
    calibration_json,
    calibration_path,
    file_sha256,
    load_saved_calibration,
    sample_calibration,
)
from .config import PruneConfig
from .distributed import Peers, leave_process_group
from .errors import STOP_SIGNALS, Interrupted, ResourceError, UsageError
from .families import Projections
from .methods import Method, Statistic, Target
from .methods.base import uncalibrated_prune
from .methods.wanda import InputSqNorm, wanda_scores
from .methods.masks import apply_mask, zero_count
from .reconstruct import reconstruct_layer, trainable
from .outdir import (
    RECORD_FILE,
    OutputLock,
    check_destination,
    check_not_source,
    check_output_dir,
    copy_support_files,
    prepare_output_dir,
    same_disk,
    write_json,
)
from .runstate import OFFLOAD_DIR, STATE_DIR, RunState, check_free_space, read_rows, saved_state, source_fingerprint
from .stream import (
    LayerReader,
    check_activations_finite,
    check_weights_finite,
    forward_batches,
    open_source,
)
from .version import __version__
from .writer import CheckpointWriter, write_atomic

# a run's dtype is part of what it is: float32 means a new run
IN_FLOAT32 = "start over in float32 with --dtype float32 --force (or --dtype float32 and a new --out)"

# observe(layer_index, hidden) sees the CPU buffer [nsamples, seqlen, hidden] after each layer:
# the inputs of the next layer. Tests use it to compare against the whole model.
Observer = Callable[[int, torch.Tensor], None]


def prune(config: PruneConfig, observe: Observer | None = None) -> dict:
    """Prune `config.model` into `config.out`, resuming an interrupted run there; returns the run
    record (also written as streamprune.json)."""
    run = PruneRun(config, observe)
    try:
        with run.output_lock:  # taken in 6, before the first write; released however the run ends
            run.check_source()  # 1. nothing is written until every check has passed
            if not run.peers.leader and not run.streams_while_pruning:
                return None  # the weights alone decide: the leader needs no help
            run.check_plan()  # 2. memory; settles --offload auto and --batch-size auto
            run.open_state()  # 3. a new run, or the unfinished one in --out (same settings only)
            run.load_calibration()  # 4. the token windows (methods that need calibration data)
            run.check_disk()  # 5. room for the output and the resume points
            run.prepare_output()  # 6. --out locked, created (its state first) or picked up
            run.allocate_buffers()  # this process's share of the activation buffer
            run.stream_layers()  # 7-8. the tensors outside the layers, then one layer at a time
            return run.finish()  # 9. index, support files, record; the state goes
    finally:
        leave_process_group()


def step(name: str):
    """Mark a PruneRun method as the run step `name` (one of plan.py's): the run records that it
    took it and the resident size after it, which benchmarks compare with the plan's terms."""

    def mark(function):
        @functools.wraps(function)
        def run_step(self, *args, **kwargs):
            result = function(self, *args, **kwargs)
            self.step_rss[name] = max(self.step_rss.get(name, 0), plan.current_rss_bytes())
            return result

        return run_step

    return mark


class PruneRun:
    """One run of `streamprune run`: its settings, source, method, state, writer and buffer."""

    def __init__(self, config: PruneConfig, observe: Observer | None = None):
        self.config, self.observe = config, observe
        self.started = time.perf_counter()
        # torchrun: one of several processes (distributed.py); else a world of one
        self.peers = Peers.from_environment(config.torch_device)
        self.device = self.peers.device(config.torch_device)
        config.quiet = config.quiet or not self.peers.leader  # one progress bar, the leader's
        self.method = config.build_method()
        self.layer_sparsities = None  # --allocation owl: each layer's, once measured
        self.step_rss: dict[str, int] = {}  # step name -> the largest resident size seen after it
        self.calibration = None  # the token windows and where they came from
        self.hidden = None  # the activation buffer [nsamples, seqlen, hidden]
        self.dense_hidden = None  # --reconstruct: the dense stream's, likewise
        self.offload_dir = None  # where an offloaded buffer's file lives
        self.output_lock = OutputLock(config.out)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        buffers.return_freed_memory_to_the_system()

    @property
    def samples(self) -> slice:
        """This process's calibration samples: all of them, or its share among several processes."""
        return self.peers.share(self.config.nsamples)

    @property
    def projections(self) -> Projections:
        """The Linears pruned in every block, by input site."""
        return self.source.runner.projections

    @property
    def streams_while_pruning(self) -> bool:
        """Whether the pruning pass pushes activations through the layers: for the method's
        statistics, or for --reconstruct's training."""
        return self.method.needs_calibration or self.config.reconstruct

    # -- 1-6: checks, then the output directory ------------------------------------------------------

    def check_source(self) -> None:
        config = self.config
        self.source = source = open_source(config.model, self.device, config.dtype)
        check_not_source(config.out, source.directory)
        if self.peers.leader:  # the leader's lock, taken in 6, is not another command's
            self.output_lock.check()
        check_destination(config.out, "--out")
        if config.offload_dir is not None:
            check_not_source(Path(config.offload_dir).expanduser(), source.directory, "--offload-dir")
            check_destination(Path(config.offload_dir), "--offload-dir")
        check_pattern_fits(config, source)
        self.seqlen = source.capped_seqlen(config.seqlen)
        calibrated = self.streams_while_pruning or config.allocation_settings() is not None
        self.calib_path = calibration_path(config.calib) if calibrated else None
        if not self.peers.alone:
            check_distributed(config, self.peers)
            if not self.streams_while_pruning and self.peers.leader:
                self.peers = Peers()  # nothing to share: the leader runs alone, the others stop

    def check_plan(self) -> None:
        """The plan: what the run will hold at its peaks, against the RAM and GPU memory it may use.
        --offload auto and --batch-size auto are decided here (a resumed run keeps its batch
        size); a run that cannot fit stops now."""
        config = self.config
        auto = config.batch_size is None or config.expert_weights == "auto"
        if auto and RunState.exists(config.out) and not config.force:  # a resume keeps what was chosen
            saved = RunState.load(config.out).structure
            if config.batch_size is None:
                config.batch_size = saved.get("batch_size")
            if config.expert_weights == "auto":
                config.expert_weights = saved.get("expert_weights") or "auto"
        geometry = plan.Geometry.from_config(self.source.checkpoint.config)
        first_linear = self.projections.names[0]
        probe = self.source.checkpoint.tensors[f"{self.source.names.layer(0)}{first_linear}.weight"]
        settings = plan.Settings(
            method=config.method,
            method_options=config.method_options(),
            allocation=config.allocation,
            sequential=config.sequential,
            reconstruct=config.reconstruct_settings(),
            pattern=config.pattern,
            nsamples=config.nsamples,
            seqlen=self.seqlen,
            batch_size=config.batch_size or 1,
            stored_bytes=probe.torch_dtype.itemsize,
            compute_bytes=self.source.dtype.itemsize,
            device=self.device.type,
            offload=config.offload,
            expert_weights=config.expert_weights,
            overlap=config.overlap,
            checkpoint_every=config.checkpoint_every,
            runtime_bytes=plan.current_rss_bytes(),
        )
        default_ram, default_vram = plan.default_limits(settings.runtime_bytes, self.device)
        max_ram = default_ram if config.max_ram_bytes is None else config.max_ram_bytes
        max_vram = default_vram if config.max_gpu_bytes is None else config.max_gpu_bytes
        if config.batch_size is None:
            config.batch_size = settings.batch_size = plan.largest_batch(geometry, settings, max_vram)
        if self.peers.alone:
            self.plan, problems = plan.fit(geometry, settings, max_ram, max_vram)
        else:  # this process's share (all of them on this machine's RAM), the leader's writes
            self.plan, problems = plan.shared(geometry, settings, self.peers.world_size, max_ram, max_vram)
        config.offload, config.expert_weights = settings.offload, settings.expert_weights
        if self.plan["experts_in_ram"]:
            self.use_experts_in_ram()
        config.checkpoint_every = self.plan["checkpoint_every"]  # the default keeps within the write budget
        # the leader's choices: they shape the result (and the resume points), and it owns those
        config.batch_size, config.checkpoint_every = self.peers.broadcast_object(
            (config.batch_size, config.checkpoint_every)
        )
        if not config.quiet or problems:
            print(plan.report(self.plan, settings, None, str(self.device), problems), file=sys.stderr)
        if problems:
            raise ResourceError(
                "this run would not fit: " + "; ".join(problems) + ". Nothing was written. "
                "See the whole plan with: " + plan_command(config)
            )
        if config.offload == "disk":
            self.offload_dir = (
                Path(config.offload_dir).expanduser() if config.offload_dir else config.out / STATE_DIR / OFFLOAD_DIR
            )

    def use_experts_in_ram(self) -> None:
        """--expert-weights cpu (asked, or the plan's choice for a layer larger than the GPU): every
        layer is built with its routed experts in RAM; each visits the GPU while it computes."""
        if self.config.reconstruct:
            raise ResourceError(
                "a layer of this model does not fit the GPU with its experts on it, and --reconstruct trains the "
                "whole layer there. Drop --reconstruct, or use a GPU with more memory. Nothing was written."
            )
        self.source.runner.expert_device = torch.device("cpu")

    def open_state(self) -> None:
        """The leader's: the others learn from it where the run stands (the layer to start from,
        and whether its inputs are saved or are the embeddings)."""
        if not self.peers.leader:
            self.state = RunState(self.config.out, {})  # never saved: a copy of the leader's position
            self.state.next_layer, self.state.activations = self.peers.broadcast_object(None)
            return
        config = self.config
        self.identity = self.run_identity()
        self.resuming = RunState.exists(config.out) and not config.force
        if self.resuming:
            self.state = RunState.load(config.out)
            self.state.check_same_run(self.identity, config.out)
            self.state_bytes = saved_state(config.out)
        else:
            check_output_dir(config.out, config.force)
            self.state = RunState(config.out, self.identity)
        # every tensor read is hashed: one that differs from what an earlier session read is refused
        self.source.checkpoint.digests = self.state.tensor_digests
        self.peers.broadcast_object((self.state.next_layer, self.state.activations))

    def run_identity(self) -> dict:
        """Every setting that shapes the output bytes: a run may only be resumed with the same ones."""
        config, calibrated, on_gpu = self.config, self.calib_path is not None, self.device.type == "cuda"
        return {
            "source": source_fingerprint(self.source.checkpoint),
            "method": self.method.name,
            **self.method.settings(),
            "sparsity": config.sparsity,
            "pattern": config.pattern,
            "allocation": config.allocation_settings(),
            "sequential": config.sequential if self.method.needs_calibration else None,
            "reconstruct": config.reconstruct_settings().as_record() if config.reconstruct else None,
            "propagate": config.propagate if calibrated else None,
            "calibration": {"file": self.calib_path.name, "sha256": file_sha256(self.calib_path)}
            if calibrated
            else None,
            "nsamples": config.nsamples if calibrated else None,
            "seqlen": self.seqlen if calibrated else None,
            "seed": config.seed if calibrated else None,
            "dtype": str(self.source.dtype).removeprefix("torch."),
            "batch_size": config.batch_size if calibrated else None,
            # where the experts' statistics and pruning ran (CPU or GPU arithmetic): only a GPU MoE run's
            "expert_weights": config.expert_weights if self.source.runner.experts and on_gpu else None,
            "max_shard_bytes": config.max_shard_bytes,
        }

    def load_calibration(self) -> None:
        if self.calib_path is None:
            return
        config = self.config
        if not self.peers.leader:
            self.calibration = {"input_ids": self.peers.broadcast_object(None)}
            return
        if self.resuming and (config.out / CALIBRATION_FILE).is_file():
            self.calibration = load_saved_calibration(config.out, config.nsamples, self.seqlen)
        else:
            sha256 = self.identity["calibration"]["sha256"]
            self.calibration = sample_calibration(config, self.calib_path, sha256, self.source.directory, self.seqlen)
        self.source.check_token_ids(self.calibration["input_ids"])
        self.peers.broadcast_object(self.calibration["input_ids"])

    def check_disk(self) -> None:
        """The planned shard layout, and room on the disk for it and the resume points' activations
        (the leader's: it alone writes)."""
        self.writer = None
        if not self.peers.leader:
            return
        config, source = self.config, self.source
        names = source.layer_names
        all_names = names[None] + [name for i in range(source.num_layers) for name in names[i]]
        info = source.checkpoint.tensors
        self.writer = CheckpointWriter(
            config.out, [(n, info[n].dtype, info[n].shape) for n in all_names], config.max_shard_bytes
        )
        needed = self.disk_needed()
        if self.offload_dir is not None and self.calibration is not None:
            offload = {"offloaded activation buffer": self.plan["buffer_bytes"]}
            if same_disk(self.offload_dir, config.out):
                needed.update(offload)
            else:
                check_free_space(self.offload_dir, offload)
        check_free_space(config.out, needed)

    def disk_needed(self) -> dict[str, int]:
        """Bytes still to be written: the rest of the checkpoint, and room for two activation files
        (the next resume point's is complete before the previous one's is deleted)."""
        state = self.state
        written = 0
        if state.writer is not None:
            written = sum(seal["bytes"] for seal in state.writer["sealed"].values())
            written += (state.writer["partial"] or {}).get("bytes", 0)
        needed = {"output checkpoint": self.writer.total_bytes - written, "activation checkpoints": 0}
        if self.calibration is not None and state.next_layer < self.source.num_layers - 1:
            buffer_bytes = self.calibration["input_ids"].numel() * self.source.runner.config.hidden_size
            buffer_bytes *= self.source.dtype.itemsize * (2 if self.config.reconstruct else 1)  # and the dense stream's
            needed["activation checkpoints"] = 2 * buffer_bytes - (buffer_bytes if state.activations else 0)
        return needed

    def prepare_output(self) -> None:
        """--out: new (its state first, so that a run killed at any later instant is resumable), or
        picked up where the interrupted run's state says (the leader's; the others only compute)."""
        self.earlier_seconds, self.layer_log = 0.0, []
        if not self.peers.leader:
            return
        config, state, num_layers = self.config, self.state, self.source.num_layers
        self.output_lock.acquire()
        # --out as it was checked in 3: another command may have written there since
        if self.resuming and saved_state(config.out) != self.state_bytes:
            raise UsageError(
                f"--out {config.out}: the unfinished run there changed while this command was starting (another "
                f"streamprune process?). Nothing was written; run the same command again"
            )
        if not self.resuming:
            check_output_dir(config.out, config.force)
        prepare_output_dir(config.out, config.force)
        before = state.sessions[-1].get("processes", 1) if state.sessions else self.peers.world_size
        session = {"from_layer": state.next_layer, "device": str(self.device)}
        state.sessions.append(session if self.peers.alone else {**session, "processes": self.peers.world_size})
        if self.resuming and before != self.peers.world_size and not config.quiet:
            print(f"the last attempt ran {before} process(es), this one {self.peers.world_size}: the layers from "
                  f"{state.next_layer} on merge their statistics over the new shares (exact for Wanda and RIA; "
                  "SparseGPT's Hessians round differently: see the README)", file=sys.stderr)  # fmt: skip
        if self.resuming:
            if state.writer is not None:
                self.writer.resume(state.writer)
            state.drop_stale()
            if not config.quiet:
                done = f"layers 0-{state.next_layer - 1} of {num_layers} are done, " if state.next_layer else ""
                where = f"resuming the run in {config.out}: {done}continuing from layer {state.next_layer}"
                print(where, file=sys.stderr)
        else:
            state.save()
        if self.calibration is not None and not (config.out / CALIBRATION_FILE).is_file():
            write_atomic(config.out / CALIBRATION_FILE, calibration_json(self.calibration))
        self.earlier_seconds = state.seconds
        self.layer_log = list(state.layers)  # per-layer sparsity and seconds; the state gets copies

    def allocate_buffers(self) -> None:
        """The activation buffer (and --reconstruct's dense one) for this process's samples."""
        config = self.config
        if self.calibration is not None and self.state.next_layer < self.source.num_layers:
            samples = self.samples.stop - self.samples.start
            shape = (samples, self.seqlen, self.source.runner.config.hidden_size)
            self.hidden = buffers.activation_buffer(shape, self.source.dtype, self.offload_dir)
            if config.reconstruct:
                self.dense_hidden = buffers.activation_buffer(shape, self.source.dtype, self.offload_dir)

    # -- 7-8: the stream ----------------------------------------------------------------------------------

    def stream_layers(self) -> None:
        """Background threads: `reads` fetches layer i+1's tensors while layer i computes; `saves`
        writes layer i's pruned tensors and its resume point while layer i+1 is read and its
        statistics are collected (which only read the buffer). The buffer is next written by the
        pruned forward, after `saves` is waited on."""
        config, state, num_layers = self.config, self.state, self.source.num_layers
        self.saves = Worker("streamprune-save", config.overlap)
        reader = LayerReader(self.source, config.overlap, pin=self.device.type == "cuda")
        try:
            with StopOnInterrupt() as stop:
                if state.writer is None and self.peers.leader:
                    self.copy_outside_tensors()
                    self.save_resume_point(0, [], with_activations=False)  # the buffer is not filled yet
                if self.config.allocation_settings() is not None:
                    self.allocate(reader, stop)
                if not self.streams_while_pruning:
                    self.hidden = None  # it served the allocation's pass only
                if self.hidden is not None:
                    self.fill_buffer()
                if self.dense_hidden is not None:
                    self.fill_dense_buffer()
                self.last_saved, self.last_saved_at = state.next_layer, time.perf_counter()
                bar = tqdm(desc="pruning", unit="layer", initial=state.next_layer, total=num_layers,
                           disable=config.quiet, dynamic_ncols=True)  # fmt: skip
                stopping = False  # as the leader decided, when several processes run
                for index, stored in reader.layers(list(range(state.next_layer, num_layers))):
                    if stopping or (stop.requested and self.peers.alone):
                        self.saves.wait()
                        raise stop.interrupted(state.next_layer, num_layers, config.out)
                    self.prune_layer(index, stored)
                    del stored
                    bar.update()
                    stopping = self.maybe_save_resume_point(index, stop.requested)
                bar.close()
                self.saves.wait()
                self.hidden = self.dense_hidden = None  # an offloaded buffer's file goes with it, before the state dir
            if self.writer is not None:
                self.writer.finish()
        except BaseException as err:
            lost = self.saves.close()
            if lost is not None and lost is not err:
                err.add_note(f"A background write had failed too, so the last resume point may be older: {lost!r}")
            if self.writer is not None:
                self.writer.abort()
            raise
        finally:
            reader.close()
            self.saves.close()

    @step(plan.COPY_OUTSIDE)
    def copy_outside_tensors(self) -> None:
        """The tensors outside the decoder layers, unchanged (first session only)."""
        for name in self.source.layer_names[None]:
            tensor = self.source.checkpoint.read(name)
            check_weights_finite(tensor, name, resume_point(self.config.out, 0))
            self.writer.write(name, tensor)
            del tensor

    def allocate(self, reader: LayerReader, stop: StopOnInterrupt) -> None:
        """--allocation owl: every layer's sparsity, from outlier ratios measured in a first pass
        over all layers (the dense stream, resumable), once per run; printed and kept in the state."""
        config, state = self.config, self.state
        if state.allocation is None or "sparsities" not in state.allocation:
            ratios = self.measure_outliers(reader, stop, list((state.allocation or {}).get("outlier_ratios", [])))
            sparsities = owl_sparsities(ratios, config.sparsity, config.owl_lambda)
            state.allocation = {"outlier_ratios": ratios, "sparsities": sparsities}
            state.activations = None  # the dense stream's; the pruning pass starts from the embeddings
            state.save()
            state.drop_stale()
        self.layer_sparsities = state.allocation["sparsities"]
        if not config.quiet:
            print(allocation_table(state.allocation), file=sys.stderr)

    @step(plan.OUTLIER_PASS)
    def measure_outliers(self, reader: LayerReader, stop: StopOnInterrupt, ratios: list[float]) -> list[float]:
        """OWL's first pass: each layer's outlier ratio of its Wanda scores, `ratios` holding those
        measured by an earlier session (whose saved activations are the next layer's inputs)."""
        config, state, runner, num_layers = self.config, self.state, self.source.runner, self.source.num_layers
        projections = self.projections
        self.fill_buffer()  # the saved activations of the dense stream, or the embeddings
        last_saved, last_saved_at = len(ratios), time.perf_counter()
        bar = tqdm(desc="outliers (owl)", unit="layer", initial=len(ratios), total=num_layers, disable=config.quiet,
                   dynamic_ncols=True)  # fmt: skip
        for index, stored in reader.layers(list(range(len(ratios), num_layers))):
            if stop.requested:
                stop.check_outliers(index, num_layers, config.out)
            self.source.check_layer_finite(index, stored, resume_point(config.out, 0))
            layer = runner.build(index, stored)
            statistics = collect_statistics(InputSqNorm, runner, layer, index, self.hidden, config.batch_size, True)
            scores = lambda: (  # noqa: E731
                wanda_scores(layer.get_submodule(local).weight.detach(), statistics[projections.site_of(local)].sq_norm)
                for local in projections.names
            )
            ratios.append(layer_outlier_ratio(scores, config.owl_m))
            del stored, layer, statistics
            check_activations_finite(self.hidden, index, resume_point(config.out, 0), IN_FLOAT32)
            bar.update()
            more = index + 1 < num_layers  # after the last one, the allocation is saved instead
            if more and (self.resume_point_due(index, last_saved, last_saved_at) or stop.requested):
                state.allocation = {"outlier_ratios": list(ratios)}
                state.activations = state.save_activations(self.hidden, index + 1, phase="owl")
                state.save()
                state.drop_stale()
                last_saved, last_saved_at = index + 1, time.perf_counter()
        bar.close()
        return ratios

    def target_for(self, index: int) -> Target:
        """What layer `index`'s Linears lose."""
        if self.layer_sparsities is None:
            return self.config.target
        return Target(sparsity=self.layer_sparsities[index])

    @step(plan.EMBED)
    def fill_buffer(self) -> None:
        """The inputs of the first layer to do in this pass: embedded calibration tokens, or a
        resume point's (of the pass the state is in)."""
        state = self.state
        if state.activations is None:
            self.source.embed(self.calibration["input_ids"][self.samples], out=self.hidden)
        elif self.peers.alone:
            state.load_activations(out=self.hidden)
        else:
            rows = read_rows(state.dir, state.activations) if self.peers.leader else None
            self.peers.scatter_rows(rows, self.hidden, self.config.nsamples)

    def fill_dense_buffer(self) -> None:
        """--reconstruct: the dense stream's inputs of the first layer to do: a resume point's, or
        the embeddings (then the same as the pruned stream's)."""
        if self.state.dense_activations is not None:
            self.state.load_activations(out=self.dense_hidden, dense=True)
        else:
            self.dense_hidden.copy_(self.hidden)

    def prune_layer(self, index: int, stored: dict[str, torch.Tensor]) -> None:
        """Layer `index`, read as `stored` (local name -> tensor in its stored dtype): pruned, handed
        to the writer, and its outputs (the next layer's inputs) left in the buffer."""
        started = time.perf_counter()
        self.source.check_layer_finite(index, stored, resume_point(self.config.out, self.last_saved))
        layer = self.source.runner.build(index, stored)
        target = self.target_for(index)
        if self.dense_hidden is not None:
            self.dense_stream_forward(index, layer)
        uncalibrated = []  # Linears no calibration token reached (experts never routed to): pruned by |W|
        if not self.method.needs_calibration:
            masks = self.prune_weights(layer, stored, None, target, self.projections.names)
        else:
            masks = {}
            for position, sites in enumerate(self.site_groups()):
                statistics = self.dense_forward(index, layer, sites, first=position == 0)
                self.peers.merge(statistics)  # into the leader's, which prunes for everyone
                linears = [linear for site in sites for linear in self.projections.sites[site]]
                if self.peers.leader:
                    masks.update(self.prune_weights(layer, stored, statistics, target, linears))
                    uncalibrated += [linear for site in sites if not statistics[site].samples
                                     for linear in self.projections.sites[site]]  # fmt: skip
                self.peers.broadcast(layer.get_submodule(local).weight.data for local in linears)
                del statistics
        reconstruction = None
        if self.dense_hidden is not None:
            reconstruction = self.reconstruct(index, layer, stored, masks)
        sparsity = self.write_and_propagate(index, layer, stored, masks)
        del layer, masks
        if self.hidden is not None:
            check_activations_finite(self.hidden, index, resume_point(self.config.out, self.last_saved), IN_FLOAT32)
            if self.observe is not None:
                self.observe(index, self.hidden)
        log = {"layer": index, "sparsity": sparsity, "seconds": time.perf_counter() - started}
        if uncalibrated:
            log["uncalibrated"] = uncalibrated
        self.layer_log.append(log if reconstruction is None else {**log, "reconstruction": reconstruction})

    def site_groups(self) -> list[tuple[str, ...]]:
        """The input sites whose statistics are collected by one forward and pruned together: all
        four from the dense layer, or with --sequential one at a time, each from the layer with the
        Linears before it already pruned (o_proj sees the pruned q/k/v's attention output, and so on)."""
        if self.config.sequential:
            return [(site,) for site in self.projections.sites]
        return [tuple(self.projections.sites)]

    @step(plan.DENSE_FORWARD)
    def dense_forward(self, index: int, layer: torch.nn.Module, sites: tuple[str, ...], first: bool
                      ) -> dict[str, Statistic]:  # fmt: skip
        """One forward of the layer over every calibration sample, collecting the method's statistic
        at `sites`. The first forward of a layer is of the dense layer; with --propagate dense its
        outputs are the next layer's inputs."""
        write_back = first and self.config.propagate == "dense"
        if write_back:
            self.saves.wait()  # this forward writes the buffer the last resume point is saving
        # another process's, in the form the leader merges (Statistic.shareable)
        statistic = self.method.statistic if self.peers.leader else self.method.statistic.shareable()
        return collect_statistics(statistic, self.source.runner, layer, index, self.hidden, self.config.batch_size,
                                  write_back, sites)  # fmt: skip

    @step(plan.PRUNE)
    def prune_weights(self, layer: torch.nn.Module, stored: dict, statistics: dict | None, target: Target,
                      linears) -> dict[str, torch.Tensor]:  # fmt: skip
        """`linears` (local names) pruned, from their sites' statistics. Where the layer computes on
        the CPU in the stored dtype, each pruned weight is the tensor to write and replaces the read
        one (freed here); elsewhere the masks are returned, to be applied to the read tensors, so
        that survivors stay bit-identical (a method's new weights are cast to the stored dtype)."""
        if self.device.type == "cpu":
            # the last layer's writes, done before its successor's largest step: on a CPU they share the
            # cores with the compute rather than overlap it (eta.py: 121 s with overlap, 122 s without)
            self.saves.wait()
        masks = {}
        for local, pruned in prune_linears(self.method, layer, statistics, target, self.projections, linears):
            module, key = layer.get_submodule(local), local + ".weight"
            if module.weight.device.type == "cpu" and module.weight.dtype == stored[key].dtype:
                stored[key] = module.weight.data
            elif pruned.weight is None:
                masks[key] = pruned.mask.cpu()
            else:
                stored[key] = apply_mask(module.weight.data.to("cpu", stored[key].dtype), pruned.mask.cpu())
        return masks

    def dense_stream_forward(self, index: int, layer: torch.nn.Module) -> None:
        """--reconstruct: the dense layer over the dense stream, in place: its outputs are both the
        targets of this layer's training and the dense stream's next inputs."""
        self.saves.wait()  # the last resume point may be saving this buffer
        forward_batches(self.source.runner, layer, index, self.dense_hidden, self.config.batch_size, write_back=True)

    @step(plan.RECONSTRUCT)
    def reconstruct(self, index: int, layer: torch.nn.Module, stored: dict, masks: dict) -> dict:
        """--reconstruct: the pruned layer trained toward the dense stream's outputs; the trained
        tensors replace the read ones for the writer (their masks are already applied)."""
        settings = self.config.reconstruct_settings()
        with torch.enable_grad():
            losses = reconstruct_layer(self.source.runner, layer, index, self.hidden, self.dense_hidden, settings,
                                       self.config.seed)  # fmt: skip
        for key in trainable(layer, self.source.runner.projections.names, settings.train_norms):
            stored[key] = layer.get_parameter(key).data.to("cpu", stored[key].dtype)
            masks.pop(key, None)
        return losses

    @step(plan.WRITE_AND_PROPAGATE)
    def write_and_propagate(self, index: int, layer: torch.nn.Module, stored: dict, masks: dict) -> float:
        """The pruned layer in its stored dtype, zeros as +0.0, to the `saves` thread; then the
        pruned forward that makes the next layer's inputs (the default --propagate pruned).
        Returns the layer's achieved sparsity over its pruned Linears."""
        # waiting first bounds what is in flight there to one layer (waiting before the masks
        # instead saves that layer's RAM during them but, with a resume point per layer, cost 10%
        # of SmolLM2's wall time: benchmarks/walltime.py)
        self.saves.wait()
        zeros = total = 0
        for name, local in self.source.layer_names[index].items() if self.peers.leader else ():
            tensor = stored[local]
            if local in masks:
                tensor = apply_mask(tensor, masks[local])
            if local.removesuffix(".weight") in self.projections.names:
                zeros += zero_count(tensor)
                total += tensor.numel()
            self.saves.submit(self.writer.write, name, tensor)
        if self.streams_while_pruning and self.config.propagate == "pruned":
            runner, batch_size = self.source.runner, self.config.batch_size
            forward_batches(runner, layer, index, self.hidden, batch_size, write_back=True)
        return zeros / total if total else None  # None: another process writes

    def resume_point_due(self, index: int, last_saved: int, last_saved_at: float) -> bool:
        """After layer `index`: every --checkpoint-every layers or --checkpoint-minutes, and at the last layer."""
        config = self.config
        minutes = config.checkpoint_minutes
        return (
            index + 1 - last_saved >= config.checkpoint_every
            or index + 1 == self.source.num_layers
            or (minutes is not None and time.perf_counter() - last_saved_at >= 60 * minutes)
        )

    def maybe_save_resume_point(self, index: int, stopping: bool) -> bool:
        """A resume point after layer `index` when one is due, and when Ctrl-C asked to stop (the
        leader decides, for every process). Returns whether to stop."""
        due = self.resume_point_due(index, self.last_saved, self.last_saved_at) or stopping
        due, stopping = self.peers.broadcast_object((due, stopping))
        if not due:
            return stopping
        more = self.hidden is not None and index + 1 < self.source.num_layers
        if self.peers.alone:
            self.saves.submit(self.save_resume_point, index + 1, list(self.layer_log))
        elif self.peers.leader:  # the whole buffer, written here as the others' rows arrive
            gathered = None
            if more:
                self.saves.wait()  # its last job may be deleting files the state no longer names
                whole = self.peers.gather_rows(self.hidden, self.config.nsamples)
                shape = [self.config.nsamples, *self.hidden.shape[1:]]
                gathered = self.state.save_activations(self.hidden, index + 1, rows=whole, shape=shape)
            self.saves.submit(self.save_resume_point, index + 1, list(self.layer_log), gathered)
        else:
            if more:
                self.peers.send_rows(self.hidden)
            self.state.next_layer = index + 1
        self.last_saved, self.last_saved_at = index + 1, time.perf_counter()
        return stopping

    def save_resume_point(self, next_layer: int, layers_done: list, gathered: dict | None = None,
                          with_activations: bool = True) -> None:  # fmt: skip
        """Shard bytes, then activations, then the state naming both: every step durable before the
        next. Runs on the `saves` thread, in order after the writes it covers. `gathered`: the
        activations, already saved from several processes' shares."""
        state = self.state
        position = self.writer.position()
        activations = gathered
        dense = None
        if gathered is None and with_activations and self.hidden is not None and next_layer < self.source.num_layers:
            activations = state.save_activations(self.hidden, next_layer)
            if self.dense_hidden is not None:
                dense = state.save_activations(self.dense_hidden, next_layer, phase="dense")
        state.writer, state.activations, state.next_layer = position, activations, next_layer
        state.dense_activations = dense
        state.layers = layers_done
        state.seconds = self.earlier_seconds + time.perf_counter() - self.started
        state.save()
        state.drop_stale()

    # -- 9 ----------------------------------------------------------------------------------------------

    def finish(self) -> dict:
        """Config and tokenizer (after the index the writer wrote last), then the record; then the
        state goes."""
        config = self.config
        self.peak_rss_bytes = self.peers.gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if not self.peers.leader:
            return None
        copy_support_files(self.source.directory, config.out)
        record = run_record(self)
        write_json(config.out / RECORD_FILE, record)
        self.state.remove()
        return record


def collect_statistics(
    statistic: type[Statistic], runner, layer: torch.nn.Module, index: int, hidden: torch.Tensor, batch_size: int,
    write_back: bool, sites: tuple[str, ...] | None = None,
) -> dict[str, Statistic]:
    """A `statistic` at each of `sites` (default: every input site), from one forward of `layer` over `hidden`."""
    projections = runner.projections
    first_linears = {site: layer.get_submodule(projections.sites[site][0]) for site in sites or projections.sites}
    # each beside its Linears' weights: an expert kept on the CPU has its statistic there too
    statistics = {site: statistic(linear.in_features, linear.weight.device) for site, linear in first_linears.items()}
    observers = {site: statistic.add_batch for site, statistic in statistics.items()}
    forward_batches(runner, layer, index, hidden, batch_size, write_back, observers=observers)
    return statistics


def prune_linears(method: Method, layer: torch.nn.Module, statistics: dict | None, target: Target,
                  projections: Projections, linears: tuple[str, ...] | None = None):  # fmt: skip
    """Prune `linears` of the layer in place (zeros as +0.0); yields (local name, Pruned) as each
    is done, so that the caller can take the result before the next one is computed. Default: all
    of them."""
    for local in linears or projections.names:
        module = layer.get_submodule(local)
        statistic = None if statistics is None else statistics[projections.site_of(local)]
        with torch.no_grad():  # the layer's weights are parameters: autograd would copy every score pass
            if statistic is not None and not statistic.samples:
                pruned = uncalibrated_prune(module.weight, target)
            else:
                pruned = method.prune(module.weight, statistic, target)
        new = module.weight.data if pruned.weight is None else pruned.weight.to(module.weight.dtype)
        module.weight.data = apply_mask(new, pruned.mask)
        yield local, pruned


class StopOnInterrupt:
    """Ctrl-C, SIGTERM (a scheduler, `kill`) and SIGHUP (a closed terminal) ask the layer loop to
    stop at its next resume point rather than at once; a second one stops at once (the work since
    the last resume point is then redone on resume)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        try:  # after SIGHUP the terminal may be gone
            print(f"\n{name}: stopping once the current layer is saved (again to stop at once)", file=sys.stderr)
        except OSError:
            pass

    def check_outliers(self, measured: int, num_layers: int, out: Path) -> None:
        raise Interrupted(
            f"interrupted: the outliers of layers 0-{measured - 1} of {num_layers} are measured and saved in {out} "
            f"(no layer is pruned yet). Run the same command again to resume the measurement from layer {measured}."
            if measured
            else f"interrupted before any layer was measured or pruned in {out}. Run the same command again to resume."
        )

    def interrupted(self, next_layer: int, num_layers: int, out: Path) -> Interrupted:
        done = f"layers 0-{next_layer - 1} of {num_layers} are saved" if next_layer else "no layer is done yet"
        return Interrupted(f"interrupted: {done} in {out}. Run the same command again to resume from layer {next_layer}.")


def allocation_table(allocation: dict) -> str:
    """OWL's result, eight layers to a line: layer: sparsity (outlier ratio)."""
    cells = [
        f"{index:>3}: {sparsity:.3f} ({ratio:.2f}%)"
        for index, (sparsity, ratio) in enumerate(zip(allocation["sparsities"], allocation["outlier_ratios"]))
    ]
    lines = ["  ".join(cells[start : start + 8]) for start in range(0, len(cells), 8)]
    return "OWL layer sparsities (outlier ratio):\n" + "\n".join(lines)


def plan_command(config: PruneConfig) -> str:
    """The `streamprune plan` command that shows a run's whole plan."""
    words = ["streamprune", "plan", config.model, "--method", config.method, "--nsamples", str(config.nsamples)]
    for option, value in config.method_options().items():
        words += [f"--{option}", str(value)] if value is not None else []
    words += ["--allocation", config.allocation] if config.allocation != "uniform" else []
    words += ["--sequential"] if config.sequential else []
    words += ["--seqlen", str(config.seqlen), "--batch-size", str(config.batch_size), "--dtype", config.dtype]
    words += ["--device", str(config.torch_device), "--offload", config.offload]
    words += ["--checkpoint-every", str(config.checkpoint_every)] if config.checkpoint_every else []
    words += ["--max-ram", config.max_ram] if config.max_ram else []
    words += ["--max-gpu-memory", config.max_gpu_memory] if config.max_gpu_memory else []
    return shlex.join(words)


def check_distributed(config: PruneConfig, peers: Peers) -> None:
    """What several processes cannot do together (yet): refused before anything is written."""
    one = "run it in one process (without torchrun, or --nproc-per-node 1)"
    if config.reconstruct:
        raise UsageError(f"--reconstruct trains each layer in one process: {one}")
    if config.allocation_settings() is not None:
        raise UsageError(f"--allocation {config.allocation}'s outlier pass runs in one process: {one}")
    if config.nsamples < peers.world_size:
        raise UsageError(
            f"--nsamples {config.nsamples} cannot be shared by {peers.world_size} processes (each needs at least "
            f"one calibration sample): raise --nsamples or start fewer processes"
        )


def check_pattern_fits(config: PruneConfig, source) -> None:
    block = config.keep_block()
    if block is None:
        return
    layer = source.runner.skeleton(0)
    for local in source.runner.projections.names:
        width = layer.get_submodule(local).in_features
        if width % block[1]:
            raise UsageError(
                f"--pattern {config.pattern}: M={block[1]} does not divide the input width {width} of {local}; "
                "choose an M that divides every Linear's input width (4 and 8 do for all supported models)"
            )


def resume_point(out: Path, next_layer: int) -> str:
    """What a run stopped now has kept, for error messages."""
    if next_layer == 0:
        return f"No layer was saved in {out}."
    return f"Layers 0-{next_layer - 1} are saved in {out} with the run state (its last resume point)."


def run_record(run: PruneRun) -> dict:
    import transformers

    config, device, state, layers = run.config, run.device, run.state, run.state.layers
    record = {
        "streamprune": __version__,
        "command": sys.argv,
        "arguments": config.as_record(),
        "source": {
            "model": config.model,
            "directory": str(run.source.directory),
            "architecture": run.source.family.architecture,
            "num_hidden_layers": run.source.num_layers,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "processes": run.peers.world_size,  # torchrun's; peak RSS is the leader's, then by process
        "compute_dtype": str(run.source.dtype).removeprefix("torch."),
        "method": {"name": run.method.name, **run.method.settings()},
        "allocation": {**(config.allocation_settings() or {"name": "uniform"}), **(state.allocation or {})},
        "target_sparsity": config.target_sparsity,
        "mean_layer_sparsity": sum(layer["sparsity"] for layer in layers) / max(1, len(layers)),
        "calibration": None,
        "layers": layers,
        "output_files": run.writer.files,
        "sessions": state.sessions,  # more than one: the run was resumed
        "total_seconds": run.earlier_seconds + time.perf_counter() - run.started,
        "peak_rss_bytes": run.peak_rss_bytes[0],
        "peak_rss_bytes_by_process": run.peak_rss_bytes,  # in rank order (torchrun); the first is this one's
        "peak_vram_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "rss_after_step_bytes": run.step_rss,  # this session's; compare with plan.ram_by_step
        "plan": {key: value for key, value in run.plan.items() if key != "peak_ram_parts"},
        "offload": config.offload,
    }
    if run.calibration is not None:
        record["calibration"] = {k: v for k, v in run.calibration.items() if k != "input_ids"}
        record["calibration"]["ids_file"] = CALIBRATION_FILE
        if run.seqlen != config.seqlen:
            record["calibration"]["seqlen_capped_from"] = config.seqlen
    return record
