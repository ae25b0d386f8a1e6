"""Steps 7-8 of a run: the tensors outside the layers, then the layer loop.

Per layer: read (the next one in the background) -> dense forward (the method's statistics) ->
prune (masks or new weights) -> write (in the background) and pruned forward (the next layer's
inputs) -> a resume point when one is due. The steps that set memory peaks carry the plan's step
names (`@step`)."""

from __future__ import annotations

import time
from typing import Callable

import torch
from tqdm import tqdm

from .. import buffers
from ..background import Worker
from ..families import Projections
from ..methods import Method, Statistic, Target
from ..methods.base import uncalibrated_prune
from ..methods.masks import apply_mask, zero_count
from ..plan import memory as plan
from ..reconstruct import reconstruct_layer, trainable
from ..runstate import read_rows
from ..stream import LayerReader, check_activations_finite, check_weights_finite, forward_batches
from .context import RunContext
from .owl import allocate
from .record import step
from .resume import IN_FLOAT32, ResumePoints, StopOnInterrupt, resume_point

# observe(layer_index, hidden) sees the CPU buffer [nsamples, seqlen, hidden] after each layer:
# the inputs of the next layer. Tests use it to compare against the whole model.
Observer = Callable[[int, torch.Tensor], None]


class LayerLoop:
    """The layers of one run, in order, from where its state stands. Owns what changes as it goes:
    the activation buffers, the background saves, the per-layer log and the resume points."""

    def __init__(self, ctx: RunContext, started: float, observe: Observer | None = None):
        self.ctx, self.observe = ctx, observe
        self.job, self.source, self.state = ctx.job, ctx.job.source, ctx.state
        self.projections: Projections = ctx.job.projections
        self.method: Method = ctx.job.method
        self.batch_size = ctx.resolved.batch_size
        self.step_rss: dict[str, int] = {}  # step name -> the largest resident size seen after it
        self.layer_sparsities = None  # --allocation owl: each layer's, once measured
        self.layer_log = list(ctx.state.layers)  # per-layer sparsity and seconds; the state gets copies
        self.hidden = self.dense_hidden = None  # the activation buffers [samples, seqlen, hidden]
        self.saves = Worker("streamprune-save", ctx.config.resources.overlap)
        self.resume = ResumePoints(ctx, self.saves, started)

    def allocate_buffers(self) -> None:
        """The activation buffer (and --reconstruct's dense one) for this process's samples."""
        if self.ctx.calibration is not None and self.state.next_layer < self.source.num_layers:
            samples = self.job.samples.stop - self.job.samples.start
            shape = (samples, self.job.seqlen, self.source.runner.config.hidden_size)
            self.hidden = buffers.activation_buffer(shape, self.source.dtype, self.ctx.resolved.offload_dir)
            if self.ctx.config.reconstruction.enabled:
                self.dense_hidden = buffers.activation_buffer(shape, self.source.dtype, self.ctx.resolved.offload_dir)

    def run(self) -> None:
        """Every layer from where the state stands (the index is the finish's, after the files copied
        beside the weights). Background threads: `reads` fetches layer i+1's tensors while layer i
        computes; `saves` writes layer i's pruned tensors and its resume point while layer i+1 is read
        and its statistics are collected (which only read the buffer). The buffer is next written by
        the pruned forward, after `saves` is waited on."""
        writer = self.ctx.writer
        reader = LayerReader(self.source, self.ctx.config.resources.overlap, pin=self.job.device.type == "cuda")
        try:
            with StopOnInterrupt() as stop:
                self.layers(reader, stop)
        except BaseException as err:
            lost = self.saves.close()
            if lost is not None and lost is not err:
                err.add_note(f"A background write had failed too, so the last resume point may be older: {lost!r}")
            if writer is not None:
                writer.abort()
            raise
        finally:
            reader.close()
            self.saves.close()

    def layers(self, reader: LayerReader, stop: StopOnInterrupt) -> None:
        state, num_layers, peers = self.state, self.source.num_layers, self.job.peers
        if state.writer is None and peers.leader:
            self.copy_outside_tensors()
            self.resume.save(0, [], None, None)  # the buffer is not filled yet
        if self.ctx.config.method.allocation_settings() is not None:
            self.layer_sparsities = allocate(self, reader, stop)
        if not self.job.streams_while_pruning:
            self.hidden = None  # it served the allocation's pass only
        if self.hidden is not None:
            self.fill_buffer()
        if self.dense_hidden is not None:
            self.fill_dense_buffer()
        self.resume.start()
        bar = tqdm(desc="pruning", unit="layer", initial=state.next_layer, total=num_layers, disable=self.job.quiet,
                   dynamic_ncols=True)  # fmt: skip
        stopping = False  # as the leader decided, when several processes run
        for index, stored in reader.layers(list(range(state.next_layer, num_layers))):
            if stopping or (stop.requested and peers.alone):
                self.saves.wait()
                raise stop.interrupted(state.next_layer, num_layers, self.job.out)
            self.prune_layer(index, stored)
            del stored
            bar.update()
            stopping = self.resume.after_layer(index, stop.requested, self.layer_log, self.hidden, self.dense_hidden)
        bar.close()
        self.saves.wait()
        self.hidden = self.dense_hidden = None  # an offloaded buffer's file goes with it, before the state dir

    @step(plan.COPY_OUTSIDE)
    def copy_outside_tensors(self) -> None:
        """The tensors outside the decoder layers, unchanged (first session only)."""
        for name in self.source.layer_names[None]:
            tensor = self.source.checkpoint.read(name)
            check_weights_finite(tensor, name, resume_point(self.job.out, 0))
            self.ctx.writer.write(name, tensor)
            del tensor

    @step(plan.EMBED)
    def fill_buffer(self) -> None:
        """The inputs of the first layer to do in this pass: embedded calibration tokens, or a
        resume point's (of the pass the state is in)."""
        state, peers = self.state, self.job.peers
        if state.activations is None:
            self.source.embed(self.ctx.calibration["input_ids"][self.job.samples], out=self.hidden)
        elif peers.alone:
            state.load_activations(out=self.hidden)
        else:
            rows = read_rows(state.dir, state.activations) if peers.leader else None
            peers.scatter_rows(rows, self.hidden, self.ctx.config.calibration.nsamples)

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
        saved = resume_point(self.job.out, self.resume.last_saved)
        self.source.check_layer_finite(index, stored, saved)
        layer = self.source.runner.build(index, stored)
        if self.dense_hidden is not None:
            self.dense_stream_forward(index, layer)
        masks, uncalibrated = self.prune_all(index, layer, stored)
        reconstruction = None
        if self.dense_hidden is not None:
            reconstruction = self.reconstruct(index, layer, stored, masks)
        sparsity = self.write_and_propagate(index, layer, stored, masks)
        del layer, masks
        if self.hidden is not None:
            check_activations_finite(self.hidden, index, saved, IN_FLOAT32)
            if self.observe is not None:
                self.observe(index, self.hidden)
        log = {"layer": index, "sparsity": sparsity, "seconds": time.perf_counter() - started}
        if uncalibrated:
            log["uncalibrated"] = uncalibrated
        self.layer_log.append(log if reconstruction is None else {**log, "reconstruction": reconstruction})

    def prune_all(self, index: int, layer: torch.nn.Module, stored: dict) -> tuple[dict, list[str]]:
        """Every Linear of the layer pruned, site group by site group: the masks to apply to the read
        tensors, and the Linears no calibration token reached (experts never routed to: pruned by |W|)."""
        target = self.target_for(index)
        if not self.method.needs_calibration:
            return self.prune_weights(layer, stored, None, target, self.projections.names), []
        masks, uncalibrated, peers = {}, [], self.job.peers
        for position, sites in enumerate(self.site_groups()):
            statistics = self.dense_forward(index, layer, sites, first=position == 0)
            peers.merge(statistics)  # into the leader's, which prunes for everyone
            linears = [linear for site in sites for linear in self.projections.sites[site]]
            if peers.leader:
                masks.update(self.prune_weights(layer, stored, statistics, target, linears))
                uncalibrated += [linear for site in sites if not statistics[site].samples
                                 for linear in self.projections.sites[site]]  # fmt: skip
            peers.broadcast(layer.get_submodule(local).weight.data for local in linears)
            del statistics
        return masks, uncalibrated

    def target_for(self, index: int) -> Target:
        """What layer `index`'s Linears lose."""
        if self.layer_sparsities is None:
            return self.ctx.config.method.target
        return Target(sparsity=self.layer_sparsities[index])

    def site_groups(self) -> list[tuple[str, ...]]:
        """The input sites whose statistics are collected by one forward and pruned together: all
        four from the dense layer, or with --sequential one at a time, each from the layer with the
        Linears before it already pruned (o_proj sees the pruned q/k/v's attention output, and so on)."""
        if self.ctx.config.method.sequential:
            return [(site,) for site in self.projections.sites]
        return [tuple(self.projections.sites)]

    def collect(self, statistic: type[Statistic], layer: torch.nn.Module, index: int, write_back: bool,
                sites: tuple[str, ...] | None = None) -> dict[str, Statistic]:  # fmt: skip
        return collect_statistics(statistic, self.source.runner, layer, index, self.hidden, self.batch_size,
                                  write_back, sites)  # fmt: skip

    @step(plan.DENSE_FORWARD)
    def dense_forward(self, index: int, layer: torch.nn.Module, sites: tuple[str, ...], first: bool
                      ) -> dict[str, Statistic]:  # fmt: skip
        """One forward of the layer over every calibration sample, collecting the method's statistic
        at `sites`. The first forward of a layer is of the dense layer; with --propagate dense its
        outputs are the next layer's inputs."""
        write_back = first and self.ctx.config.calibration.propagate == "dense"
        if write_back:
            self.saves.wait()  # this forward writes the buffer the last resume point is saving
        # another process's, in the form the leader merges (Statistic.shareable)
        statistic = self.method.statistic if self.job.peers.leader else self.method.statistic.shareable()
        return self.collect(statistic, layer, index, write_back, sites)

    @step(plan.PRUNE)
    def prune_weights(self, layer: torch.nn.Module, stored: dict, statistics: dict | None, target: Target,
                      linears) -> dict[str, torch.Tensor]:  # fmt: skip
        """`linears` (local names) pruned, from their sites' statistics. Where the layer computes on
        the CPU in the stored dtype, each pruned weight is the tensor to write and replaces the read
        one (freed here); elsewhere the masks are returned, to be applied to the read tensors, so
        that survivors stay bit-identical (a method's new weights are cast to the stored dtype)."""
        if self.job.device.type == "cpu":
            # the last layer's writes, done before its successor's largest step: on a CPU they share
            # the cores with the compute rather than overlap it (benchmarks/eta.py)
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
        forward_batches(self.source.runner, layer, index, self.dense_hidden, self.batch_size, write_back=True)

    @step(plan.RECONSTRUCT)
    def reconstruct(self, index: int, layer: torch.nn.Module, stored: dict, masks: dict) -> dict:
        """--reconstruct: the pruned layer trained toward the dense stream's outputs; the trained
        tensors replace the read ones for the writer (their masks are already applied)."""
        settings = self.ctx.config.reconstruction.settings()
        with torch.enable_grad():
            losses = reconstruct_layer(self.source.runner, layer, index, self.hidden, self.dense_hidden, settings,
                                       self.ctx.config.calibration.seed)  # fmt: skip
        for key in trainable(layer, self.projections.names, settings.train_norms):
            stored[key] = layer.get_parameter(key).data.to("cpu", stored[key].dtype)
            masks.pop(key, None)
        return losses

    @step(plan.WRITE_AND_PROPAGATE)
    def write_and_propagate(self, index: int, layer: torch.nn.Module, stored: dict, masks: dict) -> float:
        """The pruned layer in its stored dtype, zeros as +0.0, to the `saves` thread; then the
        pruned forward that makes the next layer's inputs (the default --propagate pruned).
        Returns the layer's achieved sparsity over its pruned Linears."""
        # waiting first bounds what is in flight there to one layer (waiting before the masks
        # instead costs wall time with a resume point per layer: benchmarks/walltime.py)
        self.saves.wait()
        zeros = total = 0
        for name, local in self.source.layer_names[index].items() if self.job.peers.leader else ():
            tensor = stored[local]
            if local in masks:
                tensor = apply_mask(tensor, masks[local])
            if local.removesuffix(".weight") in self.projections.names:
                zeros += zero_count(tensor)
                total += tensor.numel()
            self.saves.submit(self.ctx.writer.write, name, tensor)
        if self.job.streams_while_pruning and self.ctx.config.calibration.propagate == "pruned":
            forward_batches(self.source.runner, layer, index, self.hidden, self.batch_size, write_back=True)
        return zeros / total if total else None  # None: another process writes


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
