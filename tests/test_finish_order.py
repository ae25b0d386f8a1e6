"""A disk that fills while the files beside the weights are copied (config, tokenizer) leaves no
output that looks finished: no index and no record under their final names, exit 4 with a message
(no traceback), and the same command then finishes with the bytes of an uninterrupted run."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
from conftest import WIKITEXT, tree_digest
from typer.testing import CliRunner

import streamprune.outdir
from streamprune.cli import app
from streamprune.errors import EXIT_RESOURCES
from streamprune.outdir import INDEX_FILE, RECORD_FILE

COMMANDS = {
    "run": ["--calib", str(WIKITEXT), "--nsamples", "4", "--seqlen", "32", "--quiet"],
    "depth": ["--criterion", "magnitude", "--remove", "1", "--keep-first", "0", "--keep-last", "0", "--quiet"],
    "width": ["--criterion", "flap", "--ratio", "0.2", "--calib", str(WIKITEXT), "--nsamples", "4", "--seqlen", "32",
              "--quiet"],
}


def checkpoint_digest(out: Path) -> dict[str, str]:
    """The loadable checkpoint's files (the records hold timings)."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out.iterdir())
        if path.is_file() and (path.suffix == ".safetensors" or path.name == INDEX_FILE
                               or path.name == "config.json" or path.name.startswith("tokenizer"))
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_a_full_disk_while_copying_the_tokenizer_leaves_nothing_that_looks_finished(
    tiny_llama, tmp_path, monkeypatch, command
):
    args = [command, str(tiny_llama), *COMMANDS[command]]
    reference = tmp_path / "reference"
    assert CliRunner().invoke(app, [*args, "--out", str(reference)]).exit_code == 0
    source = tree_digest(tiny_llama)

    original = streamprune.outdir.write_atomic

    def full_at_the_tokenizer(path, data):
        if path.name.startswith("tokenizer"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, data)

    monkeypatch.setattr(streamprune.outdir, "write_atomic", full_at_the_tokenizer)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == EXIT_RESOURCES, result.output
    assert "disk is full" in result.output and "Traceback" not in result.output
    assert not (out / INDEX_FILE).exists() and not (out / RECORD_FILE).exists()

    monkeypatch.setattr(streamprune.outdir, "write_atomic", original)
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert checkpoint_digest(out) == checkpoint_digest(reference) and (out / RECORD_FILE).exists()
    assert tree_digest(tiny_llama) == source
