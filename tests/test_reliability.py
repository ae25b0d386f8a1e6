"""Everyday situations, each through the real CLI: two commands on one --out, places that cannot be
written, corrupt calibration data, malformed task files, a source that changed between an
interrupted run and its resume. Each ends with its exit code and a message naming the file or the
process, no traceback, nothing created or changed outside --out, and the source unchanged."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import C4, DATA, WIKITEXT, make_tiny_model, tree_digest
from test_hostile import listing, set_tensor
from typer.testing import CliRunner

from streamprune.cli import app, stop_signals_as_ctrl_c
from streamprune.outdir import LOCK_FILE
from streamprune.runstate import STATE_DIR

FAST = ["--calib", str(WIKITEXT), "--nsamples", "4", "--seqlen", "32", "--quiet"]
ZEROSHOT = DATA / "zeroshot"


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())  # undo line wrapping


@pytest.fixture
def model(tiny_llama, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def outputs(out: Path) -> dict[str, bytes]:
    """The checkpoint files of a completed run (the record holds timings)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "streamprune.json"}


# -- two commands on one --out ------------------------------------------------------------------


def start_run(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "streamprune", "run", str(model), "--out", str(out), *FAST, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def frozen_while_writing(run: subprocess.Popen, out: Path) -> None:
    """Stop `run` (SIGSTOP) once it holds --out: its lock taken and its state written."""
    deadline = time.monotonic() + 120
    while not ((out / LOCK_FILE).exists() and (out / STATE_DIR / "state.json").exists()):
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "the run never took its lock"
        time.sleep(0.005)
    os.kill(run.pid, signal.SIGSTOP)
    # kill returns before the stop lands: a thread mid-write finishes its write first, so wait
    # until every thread of the run is stopped ("T"), or its files may still change
    while not all(task_state(task) == "T" for task in Path(f"/proc/{run.pid}/task").iterdir()):
        assert time.monotonic() < deadline, "the run never stopped"
        time.sleep(0.005)


def task_state(task: Path) -> str:
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:  # a thread that ended meanwhile
        return "T"


@pytest.fixture(scope="module")
def single_run(tiny_llama, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("single") / "out"
    code, output = cli("run", tiny_llama, "--out", out, *FAST, "--nsamples", "32", "--seqlen", "64")
    assert code == 0, output
    return outputs(out)


def test_a_second_run_on_a_busy_out_is_refused_naming_the_first(model, tmp_path, single_run):
    out = tmp_path / "out"
    first = start_run(model, out, "--nsamples", "32", "--seqlen", "64")
    try:
        frozen_while_writing(first, out)
        before = listing(out, skip=out / "nothing")
        for extra in ([], ["--force"], ["--sparsity", "0.6", "--force"]):
            code, output = cli("run", model, "--out", out, *FAST, "--nsamples", "32", "--seqlen", "64", *extra)
            assert code == 2, output
            assert f"is in use by another streamprune process (pid {first.pid}" in output, output
            assert listing(out, skip=out / "nothing") == before, "the refused command touched the live run's files"
        code, output = cli("depth", model, "--out", out, "--remove", "1", "--calib", WIKITEXT)
        assert code == 2 and f"pid {first.pid}" in output, output
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert outputs(out) == single_run and not (out / LOCK_FILE).exists()


def test_two_runs_started_at_once_one_writes_the_other_is_refused(model, tmp_path, single_run):
    out = tmp_path / "out"
    runs = [start_run(model, out, "--nsamples", "32", "--seqlen", "64") for _ in range(2)]
    ended = sorted((run.wait(timeout=300), run.communicate()[1]) for run in runs)
    assert [code for code, _ in ended] == [0, 2], ended
    assert "Warning" not in ended[0][1], ended[0][1]  # only streamprune's own output
    refusal = " ".join(ended[1][1].split())
    # refused while the other held --out, or after it had finished there
    assert "is in use by another streamprune process" in refusal or "already holds a completed run" in refusal
    assert "Traceback" not in refusal
    assert outputs(out) == single_run


def test_a_lock_left_by_a_killed_run_is_taken_over(model, tmp_path, single_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text("999999999\nstreamprune run (killed long ago)\n")  # nobody holds its flock
    code, output = cli("run", model, "--out", out, *FAST, "--nsamples", "32", "--seqlen", "64")
    assert code == 0, output
    assert outputs(out) == single_run and not (out / LOCK_FILE).exists()


# -- places that cannot be written --------------------------------------------------------------


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in: read-only by its mode, or (root ignores
    modes) a place in /sys, where nobody may create files."""
    if os.geteuid() != 0:
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o555)
        return locked
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without /sys: no directory is unwritable")
    return Path("/sys/kernel")


@pytest.mark.parametrize("flag", ["--out", "--offload-dir"])
@pytest.mark.parametrize("place", ["a-file", "under-a-file", "unwritable"])
def test_an_unwritable_destination_is_refused_before_anything_is_written(model, tmp_path, flag, place):
    (tmp_path / "a-file").write_text("keep me")
    bad = {
        "a-file": tmp_path / "a-file",
        "under-a-file": tmp_path / "a-file" / "sub",
        "unwritable": unwritable_dir(tmp_path) / "streamprune-out",
    }[place]
    out = bad if flag == "--out" else tmp_path / "out"
    world = listing(tmp_path, skip=tmp_path / "nothing")
    source = tree_digest(model)
    extra = ["--offload", "disk", "--offload-dir", bad] if flag == "--offload-dir" else []
    code, output = cli("run", model, "--out", out, *FAST, *extra)
    assert code == 2, output
    assert f"{flag} {bad}" in output and "choose a directory" in output, output
    assert not (tmp_path / "out").exists(), "--out was created although a destination was refused"
    assert listing(tmp_path, skip=tmp_path / "nothing") == world and tree_digest(model) == source


def test_eval_refuses_an_unwritable_output_and_offload_dir(model, tmp_path):
    (tmp_path / "a-file").write_text("keep me")
    base = ["eval", model, "--ppl", WIKITEXT, "--seqlen", "32", "--limit", "1"]
    code, output = cli(*base, "--offload-dir", tmp_path / "a-file")
    assert code == 2 and "--offload-dir" in output and "is a file" in output, output
    code, output = cli(*base, "--output", tmp_path / "a-file" / "results.json")
    assert code == 2 and "--output" in output and "is a file" in output, output
    code, output = cli(*base, "--output", tmp_path)
    assert code == 2 and "is a directory" in output, output


# -- corrupt calibration data -------------------------------------------------------------------


def truncated_gzip(path: Path) -> None:
    data = C4.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_gzip_body(path: Path) -> None:
    data = bytearray(C4.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def not_gzip(path: Path) -> None:
    path.write_bytes(b"this is not gzip data at all\n" * 100)


def not_json(path: Path) -> None:
    path.write_bytes(gzip.compress(b'{"text": "fine"}\n{"text": broken\n'))


def not_utf8(path: Path) -> None:
    path.write_bytes(gzip.compress(b'{"text": "\xff\xfe"}\n'))


@pytest.mark.parametrize("command", ["run", "depth"])
@pytest.mark.parametrize(
    "breaker, phrase",
    [
        (truncated_gzip, "ends early"),
        (corrupt_gzip_body, "--calib"),
        (not_gzip, "Not a gzipped file"),
        (not_json, "line 2: not JSON"),
        (not_utf8, "not UTF-8"),
    ],
)
def test_corrupt_calibration_data_is_named(model, tmp_path, command, breaker, phrase):
    calib = tmp_path / "calib.jsonl.gz"
    breaker(calib)
    out = tmp_path / "out"
    world = listing(tmp_path, skip=out)
    args = ["run", model, "--out", out, *FAST] if command == "run" else [
        "depth", model, "--out", out, "--remove", "1", "--keep-first", "0", "--keep-last", "0"
    ]  # fmt: skip
    code, output = cli(*args, "--calib", calib, "--quiet")
    assert code == 3, output
    assert str(calib) in output and phrase in output, output
    assert not out.exists(), "bad calibration data must be found before --out is created"
    assert listing(tmp_path, skip=out) == world


# -- malformed task files -----------------------------------------------------------------------


def task_dir(tmp_path: Path) -> Path:
    tasks = tmp_path / "zeroshot"
    for name in ("arc", "piqa", "boolq", "winogrande", "hellaswag", "openbookqa"):
        (tasks / name).mkdir(parents=True)
        for path in (ZEROSHOT / name).iterdir():
            # the first 20 examples of each file are enough to break
            lines = path.read_text(encoding="utf-8").split("\n")[: 21 if path.suffix == ".tsv" else 20]
            (tasks / name / path.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tasks


def edit_line(path: Path, number: int, edit) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines), encoding="utf-8")


def set_field(key, value):
    return lambda line: json.dumps({**json.loads(line), key: value})


TASK_BREAKERS = {
    "empty file": ("boolq", "boolq/val.jsonl", lambda p: p.write_text(""), "holds no examples"),
    "a JSON list": ("arc_easy", "arc/ARC-Easy-test.jsonl", lambda p: edit_line(p, 3, lambda _: "[1, 2]"),
                    "line 3: a JSON list, not an object"),
    "not JSON": ("hellaswag", "hellaswag/hellaswag_val.jsonl", lambda p: edit_line(p, 5, lambda s: s[:-2]),
                 "line 5: not JSON"),
    "question a number": ("arc_challenge", "arc/ARC-Challenge-test.jsonl",
                          lambda p: edit_line(p, 2, set_field("question", 42)), 'line 2: "question" is not a string'),
    "endings a string": ("hellaswag", "hellaswag/hellaswag_val.jsonl",
                         lambda p: edit_line(p, 7, set_field("endings", "one ending")),
                         'line 7: "endings" is not a non-empty list of strings'),
    "label out of range": ("hellaswag", "hellaswag/hellaswag_val.jsonl",
                           lambda p: edit_line(p, 4, set_field("label", 9)), "line 4: the answer 9"),
    "missing field": ("winogrande", "winogrande/dev.jsonl",
                      lambda p: edit_line(p, 6, lambda s: json.dumps({k: v for k, v in json.loads(s).items()
                                                                       if k != "option2"})),
                      'line 6: no "option2" field'),
    "no blank": ("winogrande", "winogrande/dev.jsonl",
                 lambda p: edit_line(p, 1, set_field("sentence", "no blank here")), 'line 1: "sentence" has no'),
    "boolq label a list": ("boolq", "boolq/val.jsonl", lambda p: edit_line(p, 2, set_field("label", [True])),
                           "line 2: the answer [True]"),
    "missing labels": ("piqa", "piqa/valid-labels.lst",
                       lambda p: p.write_text("\n".join(p.read_text().split("\n")[:10]) + "\n"),
                       "has 10 labels but"),
    "bad label": ("piqa", "piqa/valid-labels.lst", lambda p: edit_line(p, 3, lambda _: "maybe"),
                  "line 3: the answer 'maybe'"),
    "directory for a file": ("openbookqa", "openbookqa/test.tsv",
                             lambda p: (p.unlink(), p.mkdir()), "Is a directory"),
    "tsv answer not a choice": ("openbookqa", "openbookqa/test.tsv",
                                lambda p: edit_line(p, 3, lambda s: s.rsplit("\t", 1)[0] + "\tZ"), "line 3: the"),
    "not UTF-8": ("arc_easy", "arc/ARC-Easy-test.jsonl", lambda p: p.write_bytes(b"\xff\xfe\x00"), "not UTF-8"),
}  # fmt: skip


@pytest.mark.parametrize("case", TASK_BREAKERS)
def test_a_malformed_task_file_is_named_with_its_line(model, tmp_path, case):
    task, file, breaker, phrase = TASK_BREAKERS[case]
    tasks = task_dir(tmp_path)
    breaker(tasks / file)
    world = listing(tmp_path, skip=tmp_path / "nothing")
    code, output = cli("eval", model, "--tasks", task, "--data-dir", tasks, "--limit", "2", "--quiet")
    assert code == 3, output
    assert str(tasks / file) in output and phrase in output, output
    assert listing(tmp_path, skip=tmp_path / "nothing") == world


def test_the_unbroken_task_files_load(model, tmp_path):
    """The copies the breakers start from are fine: every failure above is the breaker's."""
    tasks = task_dir(tmp_path)
    every = ",".join(sorted({task for task, *_ in TASK_BREAKERS.values()}))
    code, output = cli("eval", model, "--tasks", every, "--data-dir", tasks, "--limit", "2", "--quiet")
    assert code == 0, output


# -- signals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_a_command_as_ctrl_c_does(signum):
    """eval, depth and plan (run's layer loop: tests/test_resume.py) see them as KeyboardInterrupt."""
    before = signal.getsignal(signum)
    with pytest.raises(KeyboardInterrupt):
        with stop_signals_as_ctrl_c():
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the signal arrives at once: this sleep is interrupted
    assert signal.getsignal(signum) == before  # the process's own handling is back


# -- advice that works as given ----------------------------------------------------------------


def test_the_float16_overflow_advice_works_as_given(model, tmp_path):
    """float16 tops out at 65504: a norm weight of 6e4 overflows layer 1's outputs, not float32's."""
    set_tensor(model, "model.layers.1.post_attention_layernorm.weight", 6e4, count=64)
    out = tmp_path / "out"
    code, output = cli("run", model, "--out", out, *FAST, "--dtype", "float16")
    assert code == 3 and "overflowed" in output, output
    advice = "--dtype float32 --force"
    assert advice in output, output
    code, output = cli("run", model, "--out", out, *FAST, *advice.split())
    assert code == 0, output
    code, output = cli("eval", model, "--ppl", WIKITEXT, "--seqlen", "32", "--limit", "1", "--dtype", "float16")
    assert code == 3 and "evaluate with --dtype float32" in output and "prun" not in output.lower(), output


# -- a source that changed between an interrupted run and its resume -----------------------------


def interrupt_after_layer_1(model: Path, out: Path, *extra: str, pass_number: int = 0) -> None:
    """A run of `model` into `out` stopped after its layer 1 (SIGTERM during layer 1, in its pass
    `pass_number` over the layers: with OWL, pass 0 measures and pass 1 prunes)."""
    from streamprune.families import LayerRunner

    original, passes, sent = LayerRunner.forward, [0, 0], []  # [pass, last layer index]

    def forward(self, layer, index, *args, **kwargs):
        if index < passes[1]:
            passes[0] += 1
        passes[1] = index
        if index == 1 and passes[0] == pass_number and not sent:
            sent.append(index)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, layer, index, *args, **kwargs)

    LayerRunner.forward = forward
    try:
        code, output = cli("run", model, "--out", out, *FAST, *extra)
    finally:
        LayerRunner.forward = original
    assert code == 130 and "to resume" in output, output


def rewrite_inside(model: Path, tensor: str) -> Path:
    """Change bytes in the middle of `tensor` in place: same size, first and last MiB of the file
    unchanged, modification time put back. Returns the shard."""
    index = model / "model.safetensors.index.json"
    shard = model / "model.safetensors"
    if index.exists():
        shard = model / json.loads(index.read_text())["weight_map"][tensor]
    stat = shard.stat()
    data = shard.read_bytes()
    length = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + length])[tensor]["data_offsets"]
    middle = 8 + length + (begin + end) // 2
    with open(shard, "r+b") as f:
        f.seek(middle)
        f.write(bytes(b ^ 0x01 for b in data[middle : middle + 4]))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return shard


def test_a_tensor_changed_in_place_is_found_when_the_resumed_run_reads_it_again(tmp_path):
    """OWL's first pass reads every layer; the pruning pass reads them again after the resume. The
    change is where the fingerprint does not look: one 21 MB file, its first and last MiB unchanged."""
    from transformers import LlamaConfig

    wide = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=2048, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    big = make_tiny_model(tmp_path / "model", config=wide, max_shard_size="1GB")
    out = tmp_path / "out"
    owl = ("--allocation", "owl", "--sparsity", "0.5")
    interrupt_after_layer_1(big, out, *owl, pass_number=1)
    tensor = "model.layers.2.mlp.down_proj.weight"
    shard = rewrite_inside(big, tensor)
    state_before = (out / STATE_DIR / "state.json").read_bytes()
    code, output = cli("run", big, "--out", out, *FAST, *owl)
    assert code == 2, output
    assert str(shard) in output and tensor in output and "--force" in output, output
    assert not (out / "model.safetensors.index.json").exists(), "a mixed model must never be completed"
    assert (out / STATE_DIR / "state.json").read_bytes() == state_before


@pytest.mark.parametrize("change", ["replaced by a copy", "touched"])
def test_a_shard_replaced_or_touched_is_found_before_resuming(model, tmp_path, change):
    out = tmp_path / "out"
    interrupt_after_layer_1(model, out)
    shard = sorted(model.glob("model-*.safetensors"))[0]
    if change == "touched":
        os.utime(shard)  # only the modification time changes
    else:
        shutil.copy2(shard, tmp_path / "copy")  # same bytes, same modification time, another inode
        os.replace(tmp_path / "copy", shard)
    code, output = cli("run", model, "--out", out, *FAST)
    assert code == 2 and "MODEL: the run in" in output and shard.name in output and "--force" in output, output
