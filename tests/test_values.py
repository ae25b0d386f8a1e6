"""Every value checked before work: NaN, infinite, zero or negative numbers, and a removal that
would leave no model, are refused by the real CLI with exit 2 and a message naming the command's own
flag, before anything is read or written (the source unchanged, no --out)."""

from __future__ import annotations

import pytest
from conftest import WIKITEXT, tree_digest
from typer.testing import CliRunner

from streamprune.cli import app
from streamprune.errors import EXIT_BAD_INPUT, EXIT_USAGE

CASES = [
    ("run", ["--reconstruct", "--reconstruct-lr", "nan"], "--reconstruct-lr"),
    ("run", ["--reconstruct", "--reconstruct-lr", "inf"], "--reconstruct-lr"),
    ("run", ["--checkpoint-minutes", "nan"], "--checkpoint-minutes"),
    ("run", ["--seed", "-1"], "--seed"),
    ("run", ["--method", "sparsegpt", "--percdamp", "inf"], "--percdamp"),
    ("run", ["--allocation", "owl", "--owl-m", "nan"], "--owl-m"),
    ("run", ["--allocation", "owl", "--owl-lambda", "nan"], "--owl-lambda"),
    ("depth", ["--remove", "1", "--reconstruct", "--reconstruct-lr", "nan"], "--reconstruct-lr"),
    ("depth", ["--remove", "1", "--seed", "-2"], "--seed"),
    ("depth", ["--remove", "4", "--keep-first", "0", "--keep-last", "0"], "--remove 4"),
    ("depth", ["--ratio", "0.99", "--keep-first", "0", "--keep-last", "0"], "--ratio 0.99"),
    ("heal", ["--lr", "nan"], "--lr"),
    ("heal", ["--lr", "inf"], "--lr"),
    ("heal", ["--lora-alpha", "nan"], "--lora-alpha"),
    ("heal", ["--seed", "-1"], "--seed"),
    ("run", ["--eval-ppl", "{text}", "--eval-seqlen", "1"], "--eval-seqlen"),
    ("run", ["--eval-ppl", "{text}", "--eval-seqlen", "0"], "--eval-seqlen"),
    ("run", ["--eval-ppl", "{empty}"], "--eval-ppl"),
    ("heal", ["--eval-ppl", "{text}", "--eval-seqlen", "1"], "--eval-seqlen"),
    ("heal", ["--eval-ppl", "{empty}"], "--eval-ppl"),
]


@pytest.mark.parametrize("command,flags,named", CASES, ids=[" ".join([c, *f]) for c, f, _ in CASES])
def test_a_bad_value_is_refused_before_any_work(tiny_llama, tmp_path, command, flags, named):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "empty.txt").write_text(" \n\n")
    (inputs / "text.txt").write_text(WIKITEXT.read_text()[:2000])
    flags = [flag.format(empty=inputs / "empty.txt", text=inputs / "text.txt") for flag in flags]
    before, given = tree_digest(tiny_llama), tree_digest(inputs)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [command, str(tiny_llama), "--out", str(out), *flags])
    assert result.exit_code == EXIT_USAGE, result.output
    assert named in result.output and "Traceback" not in result.output, result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]
    assert tree_digest(tiny_llama) == before and tree_digest(inputs) == given


@pytest.mark.parametrize("target", ["config.json", "model-00001-of-00002.safetensors", "new.json", "ppl", "data"])
def test_eval_never_writes_into_its_source_or_over_its_inputs(tiny_llama, tmp_path, target):
    """eval --output naming a file of the model it reads, or its --ppl text, or a file inside its
    --data-dir, is refused before anything is read (exit 2, the flag named, every file unchanged)."""
    text, data = tmp_path / "text.txt", tmp_path / "zeroshot"
    text.write_text(WIKITEXT.read_text()[:2000])
    data.mkdir()
    output = {"ppl": text, "data": data / "results.json"}.get(target, tiny_llama / target)
    before, given = tree_digest(tiny_llama), tree_digest(tmp_path)
    args = ["eval", str(tiny_llama), "--ppl", str(text), "--data-dir", str(data), "--tasks", "piqa",
            "--output", str(output)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert "--output" in result.output and "Traceback" not in result.output, result.output
    assert tree_digest(tiny_llama) == before and tree_digest(tmp_path) == given


@pytest.mark.parametrize("seqlen", ["1", "0", "nan"])
def test_eval_refuses_a_window_that_scores_nothing(tiny_llama, tmp_path, seqlen):
    text = tmp_path / "text.txt"
    text.write_text(WIKITEXT.read_text()[:2000])
    output = tmp_path / "results.json"
    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "--ppl", str(text), "--seqlen", seqlen,
                                      "--output", str(output)])  # fmt: skip
    assert result.exit_code == EXIT_USAGE, result.output
    assert "--seqlen" in result.output and "Traceback" not in result.output, result.output
    assert not output.exists()


DATA_ERRORS = [  # each command's data errors name its own flags, never another command's
    ("heal", ["--data", "{short}", "--steps", "3"], ["--data", "--steps 3 x --batch-size 4"], ["--calib", "--nsamples"]),
    ("heal", ["--data", "{missing}"], ["--data"], ["--calib"]),
    ("depth", ["--remove", "1", "--keep-first", "0", "--keep-last", "0", "--calib", "{text}", "--nsamples", "1", "--seqlen", "16", "--reconstruct",
               "--reconstruct-nsamples", "500", "--reconstruct-seqlen", "128"],
     ["--reconstruct-nsamples 500 x --reconstruct-seqlen 128", "--calib"], ["--nsamples 500"]),
    ("run", ["--calib", "{short}"], ["--calib text too short", "--nsamples"], ["--data", "--steps"]),
]


@pytest.mark.parametrize("command,flags,named,unnamed", DATA_ERRORS, ids=[" ".join([c, *f]) for c, f, *_ in DATA_ERRORS])
def test_data_errors_name_the_commands_own_flags(tiny_llama, tmp_path, command, flags, named, unnamed):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "short.txt").write_text("a few words of text")
    (inputs / "text.txt").write_text(WIKITEXT.read_text()[:6000])
    flags = [f.format(short=inputs / "short.txt", text=inputs / "text.txt", missing=inputs / "no.txt") for f in flags]
    before, given = tree_digest(tiny_llama), tree_digest(inputs)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [command, str(tiny_llama), "--out", str(out), "--quiet", *flags])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert all(flag in result.output for flag in named), result.output
    assert not any(flag in result.output for flag in unnamed), result.output
    assert "Traceback" not in result.output
    assert not out.exists() and tree_digest(tiny_llama) == before and tree_digest(inputs) == given
