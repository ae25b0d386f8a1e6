"""The scoring's resume points: where a pass is, its partial scores and the tensors the rest needs,
saved in OUT/.streamprune so that a killed scoring goes on from its last save."""

from __future__ import annotations

import time

import torch

from ..runstate import ScoringState


class ScoringSaves:
    """Where the scoring is, saved in OUT/.streamprune so that a killed run goes on from its last
    save: after a block when `minutes` have passed since the last save (0: after every block), and
    at the end of every pass and round. A save holds the phase, the next position in it, the partial
    scores, and the tensors the rest needs, so resumed scores are bit-identical to uninterrupted ones.

    Phases: "magnitude", "bi", "ppl" (one per pass), "taylor forward", "taylor backward"."""

    def __init__(self, state: ScoringState, minutes: float, checkpoint, started: float):
        self.state, self.minutes, self.checkpoint, self.started = state, minutes, checkpoint, started
        saved = state.progress or {}
        self.rounds = [{**r, "scores": int_keys(r["scores"])} for r in saved.get("rounds", [])]  # finished rounds
        self.seconds_before = saved.get("seconds", 0.0)  # scoring time of earlier sessions
        checkpoint.bytes_read = saved.get("bytes_read", 0)  # the reads that made the saved results
        self.last_save = time.perf_counter()

    def resume(self, phase: str) -> tuple[int, dict]:
        """(next position, saved data) when the last save is inside `phase` of this round, else (0, {})."""
        saved = self.state.progress
        if saved is None or saved["phase"] != phase or len(saved["rounds"]) != len(self.rounds):
            return 0, {}
        data = dict(saved["data"])
        if "scores" in data:
            data["scores"] = int_keys(data["scores"])
        return saved["position"], data

    def tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.state.tensor(name, out)

    def after_block(self, phase: str, position: int, data: dict, tensors: dict, unchanged=()) -> None:
        """The blocks before `position` in `phase` are done: save when `minutes` have passed."""
        if time.perf_counter() - self.last_save >= self.minutes * 60:
            self.save(phase, position, data, tensors, unchanged)

    def save(self, phase: str | None, position: int, data: dict, tensors: dict, unchanged=()) -> None:
        progress = {
            "rounds": self.rounds,
            "phase": phase,
            "position": position,
            "data": data,
            "bytes_read": self.checkpoint.bytes_read,
            "seconds": self.seconds(),
        }
        self.state.save(progress, tensors, unchanged)
        self.last_save = time.perf_counter()

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started


def int_keys(scores: dict) -> dict[int, float]:
    """Block numbers back from JSON's string keys."""
    return {int(block): score for block, score in scores.items()}
