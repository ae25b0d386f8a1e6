"""Resume points: when one is due, what it holds (shard bytes, then activations, then the state
naming both, each durable before the next) and how a stop request waits for one."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import torch

from ..background import Worker
from ..errors import STOP_SIGNALS, Interrupted
from .context import RunContext


class ResumePoints:
    """The run state's resume points, saved on the `saves` thread in order after the writes they
    cover. `started`: when this session began (the state counts every session's seconds)."""

    def __init__(self, ctx: RunContext, saves: Worker, started: float):
        self.ctx, self.saves, self.started = ctx, saves, started
        self.earlier_seconds = ctx.state.seconds  # earlier sessions'; each save adds this one's so far
        self.start()

    def start(self) -> None:
        """The layer loop starts: the next point is due --checkpoint-every layers or minutes from now."""
        self.last_saved, self.last_saved_at = self.ctx.state.next_layer, time.perf_counter()

    def due(self, index: int, last_saved: int, last_saved_at: float) -> bool:
        """After layer `index`: every --checkpoint-every layers or --checkpoint-minutes, and at the last layer."""
        minutes = self.ctx.config.output.checkpoint_minutes
        return (
            index + 1 - last_saved >= self.ctx.resolved.checkpoint_every
            or index + 1 == self.ctx.job.source.num_layers
            or (minutes is not None and time.perf_counter() - last_saved_at >= 60 * minutes)
        )

    def after_layer(self, index: int, stopping: bool, layers_done: list, hidden: torch.Tensor | None,
                    dense_hidden: torch.Tensor | None) -> bool:  # fmt: skip
        """A resume point after layer `index` when one is due, and when Ctrl-C asked to stop (the
        leader decides, for every process). Returns whether to stop."""
        peers, state = self.ctx.job.peers, self.ctx.state
        due = self.due(index, self.last_saved, self.last_saved_at) or stopping
        due, stopping = peers.broadcast_object((due, stopping))
        if not due:
            return stopping
        more = hidden is not None and index + 1 < self.ctx.job.source.num_layers
        if peers.alone:
            self.saves.submit(self.save, index + 1, list(layers_done), hidden, dense_hidden)
        elif peers.leader:  # the whole buffer, written here as the others' rows arrive
            gathered = None
            if more:
                self.saves.wait()  # its last job may be deleting files the state no longer names
                nsamples = self.ctx.config.calibration.nsamples
                whole = peers.gather_rows(hidden, nsamples)
                shape = [nsamples, *hidden.shape[1:]]
                gathered = state.save_activations(hidden, index + 1, rows=whole, shape=shape)
            self.saves.submit(self.save, index + 1, list(layers_done), hidden, dense_hidden, gathered)
        else:
            if more:
                peers.send_rows(hidden)
            state.next_layer = index + 1
        self.last_saved, self.last_saved_at = index + 1, time.perf_counter()
        return stopping

    def save(self, next_layer: int, layers_done: list, hidden: torch.Tensor | None, dense_hidden: torch.Tensor | None,
             gathered: dict | None = None) -> None:  # fmt: skip
        """Shard bytes, then activations, then the state naming both: every step durable before the
        next. `gathered`: the activations, already saved from several processes' shares; `hidden`
        None: a point with no activations (before the buffer is filled, or after the last layer)."""
        state = self.ctx.state
        position = self.ctx.writer.position()
        activations = gathered
        dense = None
        if gathered is None and hidden is not None and next_layer < self.ctx.job.source.num_layers:
            activations = state.save_activations(hidden, next_layer)
            if dense_hidden is not None:
                dense = state.save_activations(dense_hidden, next_layer, phase="dense")
        state.writer, state.activations, state.next_layer = position, activations, next_layer
        state.dense_activations = dense
        state.layers = layers_done
        state.seconds = self.earlier_seconds + time.perf_counter() - self.started
        state.save()
        state.drop_stale()


# a run's dtype is part of what it is: float32 means a new run
IN_FLOAT32 = "start over in float32 with --dtype float32 --force (or --dtype float32 and a new --out)"


def resume_point(out: Path, next_layer: int) -> str:
    """What a run stopped now has kept, for error messages."""
    if next_layer == 0:
        return f"No layer was saved in {out}."
    return f"Layers 0-{next_layer - 1} are saved in {out} with the run state (its last resume point)."


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
