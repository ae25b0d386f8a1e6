"""`streamprune run`: prune a checkpoint one decoder layer at a time, never holding the whole model.

`prune(config)` is the library entry point the CLI calls: a short list of named steps. Steps 1-6
(setup.py) check everything before the first write and return what they decided as frozen values
(context.py); the layer loop (layers.py) is the only place that touches the device, the disk and
the calibration buffer together, and saves resume points as it goes (resume.py); --allocation owl
measures first (owl.py); the run record is written last (record.py). What happens to a layer's
weights is the method's business (methods/); reading, embedding and the micro-batch forward are the
layer stream's (stream.py)."""

from __future__ import annotations

import time

import torch

from .. import buffers
from ..config import PruneConfig
from ..distributed import Peers, leave_process_group
from ..outdir import RECORD_FILE, OutputLock, copy_support_files, write_json
from . import setup
from .context import RunContext
from .layers import LayerLoop, Observer, collect_statistics, prune_linears
from .record import peak_rss_bytes_by_process, run_record

__all__ = ["prune", "collect_statistics", "prune_linears", "Observer"]


def prune(config: PruneConfig, observe: Observer | None = None) -> dict | None:
    """Prune `config.model` into `config.output.out`, resuming an interrupted run there; returns the
    run record (also written as streamprune.json), or None in a process other than torchrun's leader.
    `observe(layer_index, hidden)` sees the activation buffer after each layer."""
    started = time.perf_counter()
    peers = Peers.from_environment(config.resources.torch_device)
    device = peers.device(config.resources.torch_device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    buffers.return_freed_memory_to_the_system()
    lock = OutputLock(config.output.out)
    try:
        with lock:  # taken in 6, before the first write; released however the run ends
            job = setup.check_source(config, peers, device, lock)  # 1. nothing is written until every check has passed
            if not job.peers.leader and not job.streams_while_pruning:
                return None  # the weights alone decide: the leader needs no help
            resolved = setup.check_plan(job)  # 2. memory; settles the auto choices
            state, resuming, state_bytes = setup.open_state(job, resolved)  # 3. new, or the unfinished one in --out
            calibration = setup.load_calibration(job, state, resuming)  # 4. the token windows
            writer = setup.check_disk(job, resolved, state, calibration)  # 5. room for the output and resume points
            setup.prepare_output(job, state, resuming, state_bytes, writer, calibration, lock)  # 6. --out
            ctx = RunContext(job, resolved, state, calibration, writer)
            loop = LayerLoop(ctx, started, observe)
            loop.allocate_buffers()  # this process's share of the activation buffer
            loop.run()  # 7-8. the tensors outside the layers, then one layer at a time
            return finish(ctx, loop)  # 9. index, support files, record; the state goes
    finally:
        leave_process_group()


def finish(ctx: RunContext, loop: LayerLoop) -> dict | None:
    """Config and tokenizer, then the index, then the record: a disk that fills before the record leaves
    no output that looks finished, and the state (removed last) resumes it."""
    peak_rss_bytes = peak_rss_bytes_by_process(ctx)
    if not ctx.job.peers.leader:
        return None
    out = ctx.job.out
    copy_support_files(ctx.job.source.directory, out)
    ctx.writer.finish()
    seconds = loop.resume.earlier_seconds + time.perf_counter() - loop.resume.started
    record = run_record(ctx, loop.step_rss, seconds, peak_rss_bytes)
    write_json(out / RECORD_FILE, record)
    ctx.state.remove()
    return record
