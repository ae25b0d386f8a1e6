"""The command line: bad input gets a clear message, a distinct exit code, and writes nothing."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from conftest import WIKITEXT, tree_digest
from typer.testing import CliRunner

import streamprune.cli
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
    expect_refusal(result, 3, "--calib text too short", "needs 4,096", "would fit", out=tmp_path / "out")


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


def test_every_option_name_is_declared_once():
    """A flag shared by several commands is one module-level declaration, used by each of them."""
    declared: dict[str, list[str]] = {}
    for path in sorted(Path(streamprune.cli.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            func = node.func if isinstance(node, ast.Call) else None
            if getattr(func, "attr", getattr(func, "id", None)) == "Option":  # typer.Option(...) or Option(...)
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        for name in arg.value.split("/"):
                            if name.startswith("--"):
                                declared.setdefault(name, []).append(f"{path.name}:{node.lineno}")
    assert "--device" in declared and "--no-overlap" in declared
    twice = {name: places for name, places in declared.items() if len(places) > 1}
    assert not twice, f"declared more than once: {twice}"


PANELS = {"Method", "Calibration and data", "Reconstruction", "Healing", "Memory and devices", "Resume", "Output"}


@pytest.mark.parametrize("command", ["run", "plan", "eval", "depth", "heal"])
def test_help_groups_options_into_panels(command):
    """Every option of every command sits in one of the same few panels; run shows all but Healing."""
    options = [p for p in typer.main.get_command(app).commands[command].params if p.param_type_name == "option"]
    assert {option.rich_help_panel for option in options} <= PANELS
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    shown = {title for title in PANELS if f"─ {title} ─" in result.output}
    if command == "run":
        assert shown == PANELS - {"Healing"}, result.output
    assert {"Memory and devices", "Output"} <= shown, result.output


@pytest.mark.parametrize("command", ["", "run", "plan", "eval", "depth", "width", "heal"])
def test_help_paragraphs_have_no_hard_line_breaks(command):
    """On a terminal wide enough, each paragraph of a command's description (and each summary in the
    command list) is one line: the source holds no line breaks inside a paragraph."""
    result = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "500"})
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    usage = next(i for i, line in enumerate(lines) if line.startswith("Usage:"))
    first_box = next(i for i, line in enumerate(lines) if line.startswith("╭"))
    description = "\n".join(lines[usage + 1 : first_box]).strip()
    assert description and all("\n" not in paragraph for paragraph in description.split("\n\n")), description
    if not command:
        commands = next(i for i, line in enumerate(lines) if "─ Commands ─" in line)
        rows = [line for line in lines[commands + 1 :] if line.startswith("│")]
        assert len(rows) == len(streamprune.cli.app.registered_commands), rows


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
