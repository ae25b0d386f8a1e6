"""What a run's setup steps decide, as frozen values: each step returns one, and the layer loop
reads them. The user's PruneConfig is never written to: what the run settles for itself (an auto
batch size, where the buffer lives, where a MoE layer's experts compute, how often it saves) is in
`Resolved`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PruneConfig
from ..distributed import Peers
from ..families import Projections
from ..methods import Method
from ..runstate import RunState
from ..stream import Source
from ..writer import CheckpointWriter


@dataclass(frozen=True)
class Job:
    """Step 1's result: the checked source and what the run does with it."""

    config: PruneConfig
    peers: Peers  # torchrun's processes, or a world of one
    device: torch.device  # this process's compute device
    method: Method
    source: Source
    seqlen: int  # --seqlen, capped at the model's context
    calib_path: Path | None  # None: the method needs no calibration data

    @property
    def quiet(self) -> bool:
        """One progress bar, the leader's."""
        return self.config.output.quiet or not self.peers.leader

    @property
    def streams_while_pruning(self) -> bool:
        """Whether the pruning pass pushes activations through the layers: for the method's
        statistics, or for --reconstruct's training."""
        return self.method.needs_calibration or self.config.reconstruction.enabled

    @property
    def samples(self) -> slice:
        """This process's calibration samples: all of them, or its share among several processes."""
        return self.peers.share(self.config.calibration.nsamples)

    @property
    def projections(self) -> Projections:
        """The Linears pruned in every block, by input site."""
        return self.source.runner.projections

    @property
    def out(self) -> Path:
        return self.config.output.out


@dataclass(frozen=True)
class Resolved:
    """Step 2's result: the plan, and the settings it decided (the leader's, for every process)."""

    plan: dict  # plan.memory.fit's: peaks by step, buffer size, ...
    batch_size: int  # calibration samples per micro-batch
    offload: str  # cpu or disk
    expert_weights: str  # gpu or cpu (or auto where the model has no experts)
    checkpoint_every: int  # layers between resume points
    offload_dir: Path | None  # the buffer's file, with --offload disk


@dataclass(frozen=True)
class RunContext:
    """Everything the layer loop needs, settled before it starts."""

    job: Job
    resolved: Resolved
    state: RunState  # the leader's, or a copy of its position in the others
    calibration: dict | None  # the token windows and where they came from; None: no calibration
    writer: CheckpointWriter | None  # the leader's; None in the others

    @property
    def config(self) -> PruneConfig:
        return self.job.config
