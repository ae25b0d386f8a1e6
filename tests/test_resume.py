"""Kill a pruning run anywhere, resume it, and get the same bytes as a run that never stopped.

Every run here goes through tests/crash_run.py, which forks one child per run from a process that
has already imported torch and transformers, and crashes the child at a chosen call: a layer's
forward, a shard's byte write, an atomic rename, the final cleanup.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, WIKITEXT, make_tiny_model, tree_digest

from streamprune.outdir import support_bytes
from streamprune.runstate import STATE_DIR
from streamprune.sizes import format_size

# 4 layers of 148 KB in 100 KB shards: layers straddle shards, and shards straddle layers; a resume
# point after every layer (the default would save fewer where OWL or --reconstruct write more)
ARGS = ["--calib", str(WIKITEXT), "--nsamples", "4", "--seqlen", "32", "--max-shard-size", "100KB",
        "--checkpoint-every", "1"]  # fmt: skip
# the parts of the run record that are measurements of one process, not results
# (the plan's peaks include the resident size of the process at the start)
VOLATILE = ("total_seconds", "peak_rss_bytes", "peak_rss_bytes_by_process", "peak_vram_bytes", "rss_after_step_bytes", "sessions", "plan")
# arguments that do not shape the result (every run here has its own --out)
ARGUMENTS_OF_THE_SESSION = (
    "out", "quiet", "checkpoint_every", "checkpoint_minutes", "overlap", "offload", "offload_dir"
)  # fmt: skip


class Crasher:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.jobs = 0
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "crash_run.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp,
        )
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def run(
        self, model: Path, out: Path, *extra: str, event=None, n=0, action=None, quiet=True
    ) -> tuple[dict, str, dict]:
        """(how the child ended, its stdout+stderr, how often each event happened)."""
        self.jobs += 1
        log, counts = self.tmp / f"job{self.jobs}.log", self.tmp / f"job{self.jobs}.counts"
        job = {
            "args": [str(model), "--out", str(out), *ARGS, *extra, *(["--quiet"] if quiet else [])],
            "log": str(log),
            "counts": str(counts),
            "event": event,
            "n": n,
            "action": action,
        }
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        ended = json.loads(self.process.stdout.readline())
        return ended, log.read_text(), json.loads(counts.read_text()) if counts.exists() else {}

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("resume") / "llama4", "llama", layers=4)


@pytest.fixture(scope="module")
def crasher(tmp_path_factory):
    crasher = Crasher(tmp_path_factory.mktemp("crash"))
    yield crasher
    crasher.close()


@pytest.fixture(scope="module")
def reference(model, crasher, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run, and how often each crash point is reached in it."""
    out = tmp_path_factory.mktemp("reference") / "out"
    ended, log, counts = crasher.run(model, out)
    assert ended == {"exit": 0}, log
    # 4 layers x (dense + pruned forward) x 4 samples, one per micro-batch; one final cleanup
    assert counts["forward"] == 32 and counts["rmtree"] == 1, counts
    return out, counts


def digest(out: Path) -> dict[str, str]:
    """sha256 of every file in `out`; for the run record, of its results without the measurements."""
    files = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.name == "streamprune.json":
            record = json.loads(data)
            for key in VOLATILE:
                record.pop(key)
            for layer in record["layers"]:
                layer.pop("seconds")
            record.pop("command")
            for key in ARGUMENTS_OF_THE_SESSION:
                record["arguments"].pop(key)
            data = json.dumps(record, sort_keys=True).encode()
        files[str(path.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return files


def check_no_partial_final_files(out: Path) -> None:
    """After a crash, every file with a final name is complete."""
    for path in out.glob("*.safetensors"):
        data = path.read_bytes()
        header_bytes = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_bytes])
        end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
        assert len(data) == 8 + header_bytes + end, f"{path.name} is partial"
    for path in out.glob("*.json"):
        json.loads(path.read_text())


# (event, which call, action), spread over the whole run. Named renames are found by probing: kill
# after each rename of the reference run in turn and see which file appeared.
CRASHES = [
    ("forward", 1, "kill"),  # inside layer 0's dense forward (forwards 8i+1..8i+4 of layer i are dense)
    ("forward", 14, "kill"),  # inside layer 1's pruned forward (8i+5..8i+8)
    ("forward", 32, "kill"),  # inside the last layer's last forward
    ("write", 3, "half-kill"),  # half of the first tensor (lm_head; writes 1-2 are the shard header)
    ("write", "middle", "half-kill"),  # in the middle of a layer's tensors
    ("write", "last", "half-kill"),  # the last tensor of the last shard
    ("replace", 1, "kill-after"),  # right after the first state file
    ("replace", 2, "kill-after"),  # calibration ids saved
    ("replace", "first shard", "kill"),  # shard written and fsynced, not yet renamed
    ("replace", "first shard", "kill-after"),  # between the shard rename and the state update
    ("replace", "first activations", "kill-after"),  # activations saved, state not yet updated
    ("replace", "index", "kill"),  # while writing the index
    ("replace", "index", "kill-after"),  # index written, config not yet
    ("replace", "last", "kill"),  # while writing the run record
    ("rmtree", 1, "kill"),  # right before the end: everything written, the state not yet removed
]


def resolve(crash, counts, rename_order) -> int:
    event, n, _ = crash
    if n == "middle":
        return counts[event] // 2
    if n == "last":
        return counts[event]
    if isinstance(n, str):
        return rename_order.index(n) + 1
    return n


def test_resume_after_sigkill_anywhere_is_byte_identical(model, crasher, reference, tmp_path):
    ref_out, counts = reference
    expected = digest(ref_out)
    source = tree_digest(model)
    # which rename is which: kill after every rename of one run and see what appeared
    labels = []
    for n in range(1, counts["replace"] + 1):
        out = tmp_path / f"probe{n}"
        ended, log, _ = crasher.run(model, out, event="replace", n=n, action="kill-after")
        assert ended == {"signal": signal.SIGKILL}, log
        labels.append(newest_file(out))
    order = label_renames(labels)
    assert {"first shard", "first activations", "index", "last"} <= set(order), order

    for number, crash in enumerate(CRASHES):
        event, _, action = crash
        n = resolve(crash, counts, order)
        out = tmp_path / f"crash{number}"
        ended, log, _ = crasher.run(model, out, event=event, n=n, action=action)
        assert ended == {"signal": signal.SIGKILL}, (crash, log)
        check_no_partial_final_files(out)
        ended, log, _ = crasher.run(model, out)
        assert ended == {"exit": 0}, (crash, log)
        assert digest(out) == expected, crash
        sessions = json.loads((out / "streamprune.json").read_text())["sessions"]
        assert len(sessions) == 2, (crash, sessions)
        assert not (out / STATE_DIR).exists()
    assert tree_digest(model) == source


def newest_file(out: Path) -> str:
    paths = [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".partial")]
    return max(paths, key=lambda p: p.stat().st_mtime_ns).name


def label_renames(names: list[str]) -> list[str]:
    order = []
    for position, name in enumerate(names):
        if name.startswith("model-") and "first shard" not in order:
            order.append("first shard")
        elif name.startswith("activations") and "first activations" not in order:
            order.append("first activations")
        elif name == "model.safetensors.index.json":
            order.append("index")
        elif position == len(names) - 1:
            order.append("last")
        else:
            order.append(name)
    return order


def test_full_disk_mid_shard_then_resume(model, crasher, reference, tmp_path):
    ref_out, counts = reference
    out = tmp_path / "out"
    ended, log, _ = crasher.run(model, out, event="write", n=counts["write"] // 2, action="enospc")
    assert ended == {"exit": 4}, log
    assert "the disk is full" in log and f"resume with: streamprune run {model} --out {out}" in log, log
    check_no_partial_final_files(out)
    ended, log, _ = crasher.run(model, out)
    assert ended == {"exit": 0}, log
    assert digest(out) == digest(ref_out)


@pytest.mark.parametrize("action, name", [("sigint", "Ctrl-C"), ("sigterm", "SIGTERM"), ("sighup", "SIGHUP")])
def test_a_stop_signal_stops_at_the_next_layer_and_says_how_to_resume(
    model, crasher, reference, tmp_path, action, name
):
    """Ctrl-C, a scheduler's SIGTERM and a closed terminal's SIGHUP all stop the run the same way."""
    ref_out, _ = reference
    out = tmp_path / "out"
    # the signal during layer 1's dense forward: layer 1 is finished and saved, then the run stops
    ended, log, _ = crasher.run(model, out, event="forward", n=10, action=action, quiet=False)
    assert ended == {"exit": 130}, log
    assert f"{name}: stopping once the current layer is saved" in log, log
    assert "layers 0-1 of 4 are saved" in log, log
    assert f"to resume: streamprune run {model} --out {out}" in log, log
    state = json.loads((out / STATE_DIR / "state.json").read_text())
    assert state["next_layer"] == 2 and state["activations"]["layer"] == 2
    # resumed without --quiet: it says so, and the progress bar starts at layer 2
    ended, log, _ = crasher.run(model, out, quiet=False)
    assert ended == {"exit": 0}, log
    assert "layers 0-1 of 4 are done, continuing from layer 2" in log, log
    assert "2/4" in log, log
    assert digest(out) == digest(ref_out)


def test_resume_with_checkpoints_every_two_layers(model, crasher, reference, tmp_path):
    """With --checkpoint-every 2 a kill in layer 3 redoes layers 2 and 3: same bytes, one fewer file write."""
    ref_out, _ = reference
    out = tmp_path / "out"
    ended, log, _ = crasher.run(model, out, "--checkpoint-every", "2", event="forward", n=26, action="kill")
    assert ended == {"signal": signal.SIGKILL}, log
    state = json.loads((out / STATE_DIR / "state.json").read_text())
    assert state["next_layer"] == 2 and [p.name for p in (out / STATE_DIR).glob("activations-*")] == [
        "activations-prune-layer00002.bin"
    ]
    ended, log, _ = crasher.run(model, out, "--checkpoint-every", "2")
    assert ended == {"exit": 0}, log
    assert digest(out) == digest(ref_out)


def test_checkpoint_minutes_saves_by_time(model, crasher, tmp_path):
    out = tmp_path / "out"
    extra = ("--checkpoint-every", "100", "--checkpoint-minutes", "0.000001")  # every layer is due by time
    # killed in layer 3's pruned forward (calls 29-32): by then layer 2's resume point, written on the
    # `saves` thread while layer 3's dense forward runs, has been waited for
    ended, log, _ = crasher.run(model, out, *extra, event="forward", n=30, action="kill")
    assert ended == {"signal": signal.SIGKILL}, log
    assert json.loads((out / STATE_DIR / "state.json").read_text())["next_layer"] == 3


@pytest.fixture
def interrupted(model, crasher, tmp_path) -> Path:
    """--out holding a run stopped by Ctrl-C after layer 1."""
    out = tmp_path / "out"
    ended, log, _ = crasher.run(model, out, event="forward", n=10, action="sigint")
    assert ended == {"exit": 130}, log
    return out


def invoke(model, out, *extra):
    from typer.testing import CliRunner

    from streamprune.cli import app

    return CliRunner().invoke(app, ["run", str(model), "--out", str(out), *ARGS, "--quiet", *extra])


@pytest.mark.parametrize(
    "extra, flag, old, new",
    [
        (["--sparsity", "0.6"], "--sparsity", "0.5", "0.6"),
        (["--pattern", "2:4"], "--pattern", "nothing", '"2:4"'),
        (["--method", "magnitude"], "--method", '"wanda"', '"magnitude"'),
        (["--seed", "1"], "--seed", "0", "1"),
        (["--max-shard-size", "1MB"], "--max-shard-size", "100000", "1000000"),
    ],
)
def test_resume_with_other_settings_is_refused(model, interrupted, extra, flag, old, new):
    state_before = (interrupted / STATE_DIR / "state.json").read_bytes()
    result = invoke(model, interrupted, *extra)
    assert result.exit_code == 2, result.output
    assert f"{flag}: the run in {interrupted} used {old}, this command asks for {new}" in result.output
    assert "new --out" in result.output and "--force" in result.output
    assert (interrupted / STATE_DIR / "state.json").read_bytes() == state_before


def test_resume_with_other_calibration_text_is_refused(model, interrupted, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(WIKITEXT.read_text()[:200_000])
    result = invoke(model, interrupted, "--calib", str(other))
    assert result.exit_code == 2, result.output
    assert "--calib: the run in" in result.output and "other.txt" in result.output


def test_resume_from_a_changed_source_is_refused(model, interrupted, tmp_path):
    changed = Path(shutil.copytree(model, tmp_path / "changed"))
    shard = sorted(changed.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor
    shard.write_bytes(bytes(data))
    result = invoke(changed, interrupted)
    assert result.exit_code == 2, result.output
    assert f"MODEL: the run in {interrupted} used" in result.output and shard.name in result.output


def test_force_discards_an_unfinished_run(model, interrupted, reference):
    ref_out, _ = reference
    result = invoke(model, interrupted, "--sparsity", "0.6", "--force")
    assert result.exit_code == 0, result.output
    record = json.loads((interrupted / "streamprune.json").read_text())
    assert record["target_sparsity"] == 0.6 and len(record["sessions"]) == 1
    assert not (interrupted / STATE_DIR).exists() and not list(interrupted.glob(".*.partial"))


def test_a_completed_run_is_not_redone(model, reference):
    ref_out, _ = reference
    result = invoke(model, ref_out)
    assert result.exit_code == 2 and "already holds a completed run" in result.output, result.output


def test_insufficient_disk_is_refused_before_any_work(model, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=300_000))
    out = tmp_path / "out"
    result = invoke(model, out)
    assert result.exit_code == 4, result.output
    # tensors: 4 layers x 147,968 B + embedding and head 131,072 B each + norm 256 B = 834.25 KiB,
    # plus the headers of the 100 KB shards; activations: two 4 x 32 x 64 float32 buffers; the
    # files copied beside the weights, as they are in the source
    support = support_bytes(model)
    text = " ".join(result.output.split())
    assert f"config and tokenizer files {format_size(support)}" in text, text
    assert f"this run needs {format_size(838.40 * 1024 + 64 * 1024 + support)} more in" in text, text
    assert "(output checkpoint 838.40 KiB, activation checkpoints 64.00 KiB, config" in text
    assert "but only 292.97 KiB is free" in text
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "kill_at"),
    [
        # 4 layers x 4 samples: the outlier pass makes forwards 1-16, the pruning pass 17-48
        (["--allocation", "owl"], 7),  # in the outlier pass, layer 1 (layer 0's ratio is saved)
        (["--allocation", "owl"], 1),  # before any layer is measured
        (["--allocation", "owl"], 27),  # in the pruning pass, layer 1 (the allocation is done)
        (["--method", "sparsegpt"], 10),  # in layer 1's dense forward: layer 0's new weights are saved
        # --reconstruct, 2 epochs of batch 2: per layer 4 statistics + 4 dense-stream + 4 training + 4 pruned
        # forwards; 21: layer 1's dense stream (both buffers of layer 0's resume point are saved)
        (["--reconstruct", "--reconstruct-epochs", "2", "--reconstruct-batch-size", "2"], 21),
        (["--reconstruct", "--reconstruct-epochs", "2", "--reconstruct-batch-size", "2"], 27),  # in layer 1's training
    ],
)
def test_killed_owl_and_sparsegpt_runs_resume_byte_identical(model, crasher, tmp_path, flags, kill_at):
    whole = tmp_path / "whole"
    ended, log, counts = crasher.run(model, whole, *flags)
    assert ended == {"exit": 0}, log
    out = tmp_path / "out"
    ended, log, _ = crasher.run(model, out, *flags, event="forward", n=kill_at, action="kill")
    assert ended == {"signal": signal.SIGKILL}, log
    check_no_partial_final_files(out)
    state = json.loads((out / STATE_DIR / "state.json").read_text())
    if "owl" in flags and kill_at == 7:
        assert len(state["allocation"]["outlier_ratios"]) == 1 and state["activations"]["phase"] == "owl"
    ended, log, _ = crasher.run(model, out, *flags)
    assert ended == {"exit": 0}, log
    assert digest(out) == digest(whole)
