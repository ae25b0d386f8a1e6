"""The command line: bad input gets a clear message, a distinct exit code, and writes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import WIKITEXT, tree_digest
from typer.testing import CliRunner

from streamprune.cli import app

FAST = ["--calib", str(WIKITEXT), "--nsamples", "4", "--seqlen", "32", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(app, ["run", *map(str, args)])


@pytest.fixture
def model(tiny_llama, tmp_path) -> Path:
    """A private copy of the tiny model that a test may break."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def expect_refusal(result, exit_code: int, *phrases: str, out: Path | None = None):
    assert result.exit_code == exit_code, result.output
    for phrase in phrases:
        assert phrase in result.output, result.output
    if out is not None:
        assert not out.exists(), "a refused run must not create --out"


def test_run_succeeds_and_prints_summary(model, tmp_path):
    before = tree_digest(model)
    result = invoke(model, "--out", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    assert "pruned 3 layers" in result.output and "peak RSS" in result.output
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert tree_digest(model) == before


def test_missing_model(tmp_path):
    expect_refusal(invoke(tmp_path / "nope", "--out", tmp_path / "out"), 3, "no model directory", out=tmp_path / "out")


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2"])
def test_sparsity_outside_open_interval(model, tmp_path, value):
    expect_refusal(
        invoke(model, "--out", tmp_path / "out", "--sparsity", value, *FAST), 2, "outside (0, 1)", out=tmp_path / "out"
    )


@pytest.mark.parametrize(
    "pattern,phrase",
    [
        ("4:4", "less than M"),
        ("5:4", "less than M"),
        ("0:4", "at least 1"),
        ("2:6", "does not divide the input width 64"),
        ("2-4", "is not N:M"),
    ],
)
def test_bad_patterns(model, tmp_path, pattern, phrase):
    expect_refusal(
        invoke(model, "--out", tmp_path / "out", "--pattern", pattern, *FAST), 2, phrase, out=tmp_path / "out"
    )


def test_sparsity_and_pattern_together(model, tmp_path):
    expect_refusal(
        invoke(model, "--out", tmp_path / "out", "--pattern", "2:4", "--sparsity", "0.5", *FAST),
        2,
        "not both",
        out=tmp_path / "out",
    )


def test_calibration_too_short(model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only, repeated. " * 20)
    result = invoke(model, "--out", tmp_path / "out", "--calib", short, "--nsamples", "64", "--seqlen", "64")
    expect_refusal(result, 3, "calibration text too short", "needs 4,096", "would fit", out=tmp_path / "out")


def test_calibration_file_missing(model, tmp_path):
    expect_refusal(
        invoke(model, "--out", tmp_path / "out", "--calib", tmp_path / "none.jsonl"),
        3,
        "no such file",
        out=tmp_path / "out",
    )


def test_out_equal_to_or_inside_source(model, tmp_path):
    before = tree_digest(model)
    expect_refusal(invoke(model, "--out", model, *FAST, "--force"), 2, "is the source directory")
    expect_refusal(
        invoke(model, "--out", model / "pruned", *FAST, "--force"),
        2,
        "inside the source directory",
        out=model / "pruned",
    )
    assert tree_digest(model) == before


def test_non_empty_out_needs_force_and_force_replaces_the_old_checkpoint(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors").write_bytes(b"old weights that would shadow the index")
    expect_refusal(invoke(model, "--out", out, *FAST), 2, "not empty", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "notes.txt"]
    result = invoke(model, "--out", out, *FAST, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "model.safetensors").exists() and (out / "notes.txt").read_text() == "mine"


def test_hub_id_offline_fails_fast_and_suggests_a_local_path(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, "-m", "streamprune", "run", "smollm2-135m", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 4, result.stderr
    assert "HuggingFaceTB/SmolLM2-135M" in result.stderr and "not reachable" in result.stderr
    assert "pass its local directory in place of smollm2-135m" in result.stderr
    assert not (tmp_path / "o").exists()


def test_calib_c4_offline_fails_fast_and_suggests_local_text(tiny_llama, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    command = [sys.executable, "-m", "streamprune", "run", str(tiny_llama), "--out", str(tmp_path / "o"), "--quiet"]
    result = subprocess.run([*command, "--calib", "c4"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 4, result.stderr
    assert "allenai/c4" in result.stderr and "--calib PATH" in result.stderr
    assert not (tmp_path / "o").exists()


def test_help_explains_pattern():
    result = CliRunner().invoke(app, ["run", "--help"], terminal_width=200)
    text = " ".join(result.output.replace("│", " ").split())  # undo rich's wrapping and box
    assert result.exit_code == 0 and "keep N of every M consecutive input weights" in text


def test_full_disk_is_reported_with_the_command_that_resumes(model, tmp_path, monkeypatch):
    """(tests/test_resume.py resumes such a run and checks the bytes.)"""
    import errno

    from streamprune.writer import CheckpointWriter

    real_write, calls = CheckpointWriter.write, []

    def write_until_full(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(self._temp_path))
        real_write(self, name, tensor)

    monkeypatch.setattr(CheckpointWriter, "write", write_until_full)
    result = invoke(model, "--out", tmp_path / "out", *FAST)
    expect_refusal(result, 4, "the disk is full", "up to the last saved layer is kept", "resume with: streamprune")
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_version():
    from streamprune.version import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"streamprune {__version__}"
