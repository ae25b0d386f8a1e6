"""Several processes on one run (torchrun, gloo on the CPU): Wanda's output byte for byte the one
process's (with the same kernels: one thread each), SparseGPT's within the rounding of another
summation order, and resume across a change of process count.

Every run goes through tests/kill_at.py (plain `streamprune run`, whose leader can be SIGKILLed at
its N-th layer forward), under `python -m torch.distributed.run --standalone --nproc-per-node 2`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, WIKITEXT, make_tiny_model
from reference_wanda import LINEARS
from test_pipeline import load_state

from streamprune.runstate import STATE_DIR, read_tensor_file

LAYERS = 4
NSAMPLES = 6  # 3 a process: a forward of each layer's statistics and one of its pruned outputs
ARGS = ["--calib", str(WIKITEXT), "--nsamples", str(NSAMPLES), "--seqlen", "32", "--checkpoint-every", "1",
        "--no-overlap", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("dist") / "llama", "llama", layers=LAYERS)


def run(model: Path, out: Path, *extra: str, processes: int = 1, kill_at: int = 0) -> subprocess.CompletedProcess:
    command = [str(ROOT / "tests" / "kill_at.py"), str(kill_at), "run", str(model), "--out", str(out), *ARGS, *extra]
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        command = [sys.executable, *launcher, *command]
    else:
        command = [sys.executable, *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it: the same kernels alone and shared
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def masks(out: Path) -> dict[str, torch.Tensor]:
    return {name: t == 0 for name, t in load_state(out).items() if any(f"{p}." in name for p in LINEARS)}


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    same = sum(int((a[name] == b[name]).sum()) for name in a)
    return same / sum(t.numel() for t in a.values())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_two_processes_equal_one(model, tmp_path, method):
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    extra = ["--method", method, *(["--pattern", "2:4"] if method == "sparsegpt" else [])]
    assert run(model, alone, *extra).returncode == 0
    done = run(model, shared, *extra, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = load_state(alone), load_state(shared)
    if method == "wanda":  # the leader continues the running mean with the others' samples: exact
        assert all(torch.equal(two[name], one[name]) for name in one)
    else:  # Hessians merged as weighted sums: the rounding of another order
        assert agreement(masks(alone), masks(shared)) >= 0.999
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4)
    record = json.loads((shared / "streamprune.json").read_text())
    assert record["sessions"][0]["processes"] == record["processes"] == 2
    assert len(record["peak_rss_bytes_by_process"]) == 2 and min(record["peak_rss_bytes_by_process"]) > 100e6
    assert record["calibration"]["nsamples"] == NSAMPLES
    assert len(record["layers"]) == LAYERS and all(layer["sparsity"] == 0.5 for layer in record["layers"])
    # the leader alone wrote: one record, one index, no files of the others
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in alone.iterdir())


def test_resume_with_another_process_count(model, tmp_path):
    """Killed in the middle of layer 2 (after its inputs were saved): the two processes' saved
    buffer (written by the leader as the rows arrived) equals the one process's, and each run
    resumes with the other process count to the uninterrupted result."""
    alone = tmp_path / "alone"
    assert run(model, alone).returncode == 0
    # one process forwards 2 x 6 samples a layer, each of two processes 2 x 3: the first forward of layer 2
    killed_alone, killed_shared = tmp_path / "killed-alone", tmp_path / "killed-shared"
    assert run(model, killed_alone, kill_at=2 * 2 * NSAMPLES + 1).returncode == -signal.SIGKILL
    died = run(model, killed_shared, processes=2, kill_at=2 * NSAMPLES + 1)
    assert died.returncode != 0
    saved = {}
    for out in (killed_alone, killed_shared):
        state = json.loads((out / STATE_DIR / "state.json").read_text())
        assert state["next_layer"] == 2 and state["activations"]["layer"] == 2
        saved[out] = read_tensor_file(out / STATE_DIR, state["activations"])
    assert saved[killed_shared].shape == (NSAMPLES, 32, 64)
    assert torch.equal(saved[killed_shared], saved[killed_alone])

    resumed = run(model, killed_alone, processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run(model, killed_shared).returncode == 0
    for out in (killed_alone, killed_shared):  # Wanda's merge is exact: the same bytes
        resumed, uninterrupted = load_state(out), load_state(alone)
        assert resumed.keys() == uninterrupted.keys()
        assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)
        sessions = json.loads((out / "streamprune.json").read_text())["sessions"]
        assert [session.get("processes", 1) for session in sessions] in ([1, 2], [2, 1])


def test_refused_together(model, tmp_path):
    done = run(model, tmp_path / "out", "--reconstruct", processes=2)
    assert done.returncode == 1  # torchrun's, for any failed process (each exited 2, a usage error)
    assert "exitcode  : 2" in done.stderr
    assert "--reconstruct trains each layer in one process" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["eval", "depth", "heal"])
def test_one_process_commands_refuse_torchrun(model, tmp_path, command, monkeypatch):
    from typer.testing import CliRunner

    from streamprune.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = {"eval": ["--ppl", str(WIKITEXT)], "depth": ["--out", str(tmp_path / "d"), "--remove", "1"],
            "heal": ["--out", str(tmp_path / "h")]}[command]  # fmt: skip
    result = CliRunner().invoke(app, [command, str(model), *args])
    assert result.exit_code == 2
    assert f"streamprune {command} runs in one process" in result.output
    assert not any(tmp_path.iterdir())
