"""The hub path, tested for real: the CLI in a subprocess downloads from a local stand-in for the
hub's read API (tests/hub_server.py; HF_ENDPOINT points at it, HF_HOME is a fresh cache), the way it
downloads from huggingface.co: a tiny model repo, C4's calibration shard, WikiText-2's parquet file.

What is checked: which files are fetched (config, tokenizer and safetensors only), a shard the hub
answers 404 for or cuts off mid-body (a clear message, the exit code of the README's table, and the
same command succeeding once the file is whole), a hub that never answers (an exit, not a hang),
offline with a warm cache (works, and nothing reaches the network) and with a cold one (a clear
message in under 10 s), and `eval --ppl wikitext2` from the hub scoring what the local file scores.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import C4, DATA, WIKITEXT, make_tiny_model
from hub_server import HubServer, Repo
from typer.testing import CliRunner

from streamprune.cli import app
from streamprune.errors import EXIT_BAD_INPUT, EXIT_RESOURCES

MODEL = "tiny-org/tiny-llama"
# what a real model repo holds beside its checkpoint: none of it may be downloaded
EXTRAS = {
    "pytorch_model.bin": b"\x80\x02 a pickle: never downloaded",
    "original/consolidated.00.pth": b"\x80\x02 another pickle",
    "modeling_tiny.py": b"raise SystemExit('remote code: never downloaded')\n",
    "README.md": b"# tiny-llama\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
}
C4_REPO, C4_SHARD = "allenai/c4", "en/c4-train.00000-of-01024.json.gz"
WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT_SHA = "b08601e04326c79dfdd32d625aee71d232d685c3"  # the revision streamprune pins
WIKITEXT_TEST = "wikitext-2-raw-v1/test-00000-of-00001.parquet"
SHARD = "model-00002-of-00012.safetensors"  # one of the tiny model's shards (60 KB each)
RUN = ("--nsamples", "2", "--seqlen", "32", "-q")


def parquet(rows: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": pa.array(rows, pa.string())}), buffer)
    return buffer.getvalue()


def wikitext_rows() -> list[str]:
    """WikiText-2 test as the hub's dataset rows: the data folder's copy of them where it has one,
    else read back from wiki.test.raw (each line a row, a line of one space an empty row: the same rows)."""
    rows_file = DATA / "wikitext2" / "wiki.test.hf_rows.jsonl"
    if rows_file.is_file():
        return [json.loads(line)["text"] for line in rows_file.read_text(encoding="utf-8").splitlines()]
    return ["" if line == " \n" else line for line in WIKITEXT.read_text(encoding="utf-8").splitlines(keepends=True)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("hub-model") / "tiny-llama")


@pytest.fixture(scope="module")
def hub(tiny) -> HubServer:
    """The stand-in hub: the tiny model (and files that must not be fetched), C4's shard, WikiText-2."""
    checkpoint = {p.name: p.read_bytes() for p in tiny.iterdir() if p.is_file()}
    with HubServer() as server:
        server.add(Repo(MODEL, {**checkpoint, **EXTRAS}))
        server.add(Repo(C4_REPO, {C4_SHARD: C4.read_bytes(), "en/c4-validation.00000-of-00008.json.gz": b"\x1f\x8b",
                                  "README.md": b"# c4\n"}, repo_type="dataset"))  # fmt: skip
        if importlib.util.find_spec("pyarrow") is not None:  # the eval extra's; without it that test is skipped
            wikitext = {WIKITEXT_TEST: parquet(wikitext_rows()), "README.md": b"# wikitext\n",
                        "wikitext-2-raw-v1/train-00000-of-00001.parquet": parquet(["not used\n"])}  # fmt: skip
            server.add(Repo(WIKITEXT_REPO, wikitext, repo_type="dataset", sha=WIKITEXT_SHA))
        yield server


@pytest.fixture(autouse=True)
def fresh_log(hub):
    """Each test starts with no faults and an empty request log."""
    hub.heal()
    hub.clear()
    yield
    hub.heal()


# `python -m streamprune ARGS`, with one line on stderr once the CLI's modules are imported: what a
# command takes is timed from there, as interpreter start-up (~4 s of CPU, mostly torch; 8 s and more
# on a loaded 2-core machine) is no part of how long a download takes to give up
LOADED = "streamprune loaded at "
CLI = (f"import runpy, sys, time; import streamprune.cli; print({LOADED!r} + repr(time.time()), file=sys.stderr, "
       "flush=True); sys.argv[0] = 'streamprune'; runpy.run_module('streamprune', run_name='__main__')")  # fmt: skip


def streamprune(endpoint: str, home: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """The real CLI in a subprocess against `endpoint`, with `home` as HF_HOME: the result, and the
    seconds from the CLI's modules being loaded to its exit."""
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE"))
                   and k.lower() not in ("https_proxy", "http_proxy", "all_proxy")
                   and k != "STREAMPRUNE_DATA"}  # fmt: skip  # the data folder would stand in for the hub
    environment.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1",
                       no_proxy="127.0.0.1", **env)  # fmt: skip
    result = subprocess.run([sys.executable, "-c", CLI, *args], env=environment, capture_output=True, text=True,
                            timeout=300, check=False)  # fmt: skip
    ended = time.time()
    loaded = [float(line[len(LOADED):]) for line in result.stderr.splitlines() if line.startswith(LOADED)]
    assert loaded, result.stderr
    return result, ended - loaded[0]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's error message, checked to be one and traceback-free."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def closed_port() -> str:
    """An endpoint on 127.0.0.1 nothing listens on: the hub unreachable, refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def cached_file(home: Path, repo: str, filename: str, repo_type: str = "model") -> Path:
    (path,) = (home / "hub" / f"{repo_type}s--{repo.replace('/', '--')}" / "snapshots").glob(f"*/{filename}")
    return path


@pytest.fixture(scope="module")
def warm(hub, tiny, tmp_path_factory):
    """`run MODEL` (calibrated on --calib c4) into a fresh cache: the result, the requests it made, the cache."""
    home = tmp_path_factory.mktemp("hf-warm")
    hub.clear()
    result, _ = streamprune(hub.endpoint, home, "run", MODEL, "--calib", "c4", *RUN, "-o", str(home / "out"))
    return result, list(hub.requests), home


def test_run_downloads_only_config_tokenizer_and_safetensors(hub, tiny, warm):
    result, requests, home = warm
    assert result.returncode == 0, result.stderr
    checkpoint = {p.name for p in tiny.iterdir() if p.is_file()}
    assert {p.suffix for p in map(Path, checkpoint)} == {".json", ".safetensors"}
    model_files = {r.filename for r in requests if r.repo_id == MODEL}
    bodies = {r.filename for r in requests if r.repo_id == MODEL and r.method == "GET"}
    assert model_files == bodies == checkpoint  # the extras: not even a HEAD
    assert {r.filename for r in requests if r.repo_id == C4_REPO} == {C4_SHARD}
    assert not {r.filename for r in requests if r.repo_id == WIKITEXT_REPO}
    for name in checkpoint:  # the bytes the hub served, whole
        assert cached_file(home, MODEL, name).read_bytes() == (tiny / name).read_bytes()
    record = json.loads((home / "out" / "streamprune.json").read_text())
    assert record["calibration"]["source"] == "c4"
    assert Path(record["calibration"]["file"]).name == Path(C4_SHARD).name
    assert record["calibration"]["sha256"] == hashlib.sha256(C4.read_bytes()).hexdigest()


def test_offline_with_a_warm_cache_works_without_a_network_call(hub, warm):
    assert warm[0].returncode == 0, warm[0].stderr
    home = warm[2]
    result, _ = streamprune(hub.endpoint, home, "run", MODEL, "--calib", "c4", *RUN, "-o", str(home / "offline"),
                            HF_HUB_OFFLINE="1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert hub.connections == 0 and not hub.requests  # not even a TCP connection
    original, again = (json.loads((home / out / "streamprune.json").read_text())["calibration"]
                       for out in ("out", "offline"))  # fmt: skip
    assert again["sha256"] == original["sha256"]  # the same cached shard


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no-network"])
def test_offline_with_a_cold_cache_says_so_within_10_s(hub, tmp_path, offline):
    endpoint, env = (hub.endpoint, {"HF_HUB_OFFLINE": "1"}) if offline == "HF_HUB_OFFLINE" else (closed_port(), {})
    result, seconds = streamprune(endpoint, tmp_path, "run", MODEL, *RUN, "-o", str(tmp_path / "out"), **env)
    assert result.returncode == EXIT_RESOURCES
    message = error_line(result)
    assert f"cannot download {MODEL}" in message and "not" in message and "cache" in message
    assert "the Hugging Face hub is not reachable" in message
    assert f"(hf download {MODEL} --local-dir DIR), then pass its local directory in place of {MODEL}" in message
    assert ("HF_HUB_OFFLINE is set" in message) == (offline == "HF_HUB_OFFLINE")
    assert seconds < 10, f"{seconds:.1f} s"
    assert hub.connections == 0
    assert not (tmp_path / "out").exists()


def test_plan_fetches_only_the_config(hub, tmp_path):
    result, _ = streamprune(hub.endpoint, tmp_path, "plan", MODEL, "--nsamples", "2", "--seqlen", "32",
                            "--device", "rtx4090")  # fmt: skip  # a named GPU: nothing to probe here
    assert result.returncode == 0, result.stderr
    assert hub.touched(MODEL) == hub.fetched(MODEL) == {"config.json"}
    assert not hub.touched(C4_REPO)


def test_a_missing_or_cut_shard_fails_clearly_then_the_same_command_succeeds(hub, tiny, tmp_path):
    command = ("run", MODEL, "--method", "magnitude", "--sparsity", "0.5", "-q", "-o", str(tmp_path / "out"))

    hub.missing(MODEL, SHARD)  # listed in the tree, 404 when asked for
    result, _ = streamprune(hub.endpoint, tmp_path, *command)
    assert result.returncode == EXIT_BAD_INPUT
    assert f"the hub answered 404 Not Found for {SHARD}" in error_line(result)

    hub.heal()
    hub.cut(MODEL, SHARD)  # every answer stops at half the file, its whole length announced
    result, _ = streamprune(hub.endpoint, tmp_path, *command)
    assert result.returncode == EXIT_RESOURCES
    message = error_line(result)
    assert "the connection broke off mid-download" in message and "run the same command again" in message
    assert not (tmp_path / "out" / "config.json").exists()

    hub.heal()
    hub.clear()
    hub.cut(MODEL, SHARD, times=1)  # whole again, after one more cut: huggingface_hub asks again by itself
    result, _ = streamprune(hub.endpoint, tmp_path, *command)
    assert result.returncode == 0, result.stderr
    assert cached_file(tmp_path, MODEL, SHARD).read_bytes() == (tiny / SHARD).read_bytes()
    assert len([r for r in hub.requests if r.filename == SHARD and r.method == "GET" and r.server == "cdn"]) == 2
    assert (tmp_path / "out" / "streamprune.json").is_file()


def test_a_hub_that_never_answers_ends_in_a_message_not_a_hang(hub, tmp_path):
    hub.stall()  # connections accepted, nothing ever answered
    result, seconds = streamprune(hub.endpoint, tmp_path, "run", MODEL, *RUN, "-o", str(tmp_path / "out"),
                                  HF_HUB_ETAG_TIMEOUT="1")  # fmt: skip
    assert result.returncode == EXIT_RESOURCES
    assert "the hub stopped answering" in error_line(result)
    assert seconds < 60


def test_eval_ppl_wikitext2_from_the_hub_equals_the_local_file(hub, tiny, tmp_path):
    pytest.importorskip("pyarrow", reason="--ppl wikitext2 reads the hub's parquet file: pip install -e '.[eval]'")
    hub_json, local_json = tmp_path / "hub.json", tmp_path / "local.json"
    result, _ = streamprune(hub.endpoint, tmp_path, "eval", MODEL, "--ppl", "wikitext2", "--seqlen", "32",
                            "--limit", "4", "--output", str(hub_json))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert hub.touched(WIKITEXT_REPO) == hub.fetched(WIKITEXT_REPO) == {WIKITEXT_TEST}
    resolved = [r.path for r in hub.requests if r.repo_id == WIKITEXT_REPO and r.server == "hub"]
    assert resolved and all(f"/resolve/{WIKITEXT_SHA}/" in path for path in resolved)  # the pinned revision
    local = CliRunner().invoke(app, ["eval", str(tiny), "--ppl", str(WIKITEXT), "--seqlen", "32", "--limit", "4",
                                     "--output", str(local_json)])  # fmt: skip  # in this process: no hub involved
    assert local.exit_code == 0, local.output
    from_hub, local = (json.loads(path.read_text())["perplexity"] for path in (hub_json, local_json))
    assert from_hub["windows"] == local["windows"] == 4
    assert from_hub["ppl"] == local["ppl"]


def test_fetch_data_fills_a_data_folder_that_then_serves_offline(hub, tiny, tmp_path):
    """fetch-data DIR --c4 against the hub: wiki.test.raw as the official file, the C4 shard as served;
    then, offline and with an empty cache, eval --ppl wikitext2 and --calib c4 read that folder."""
    pytest.importorskip("pyarrow", reason="fetch-data reads the hub's parquet file: pip install -e '.[eval]'")
    folder = tmp_path / "data"
    result, _ = streamprune(hub.endpoint, tmp_path / "hf", "fetch-data", str(folder), "--c4")
    assert result.returncode == 0, result.stderr
    assert (folder / "wikitext2" / "wiki.test.raw").read_bytes() == WIKITEXT.read_bytes()
    assert (folder / "c4" / "c4-train.00000-of-01024.json.gz").read_bytes() == C4.read_bytes()
    offline = {"HF_HUB_OFFLINE": "1", "STREAMPRUNE_DATA": str(folder)}
    evaluated, _ = streamprune(hub.endpoint, tmp_path / "empty", "eval", str(tiny), "--ppl", "wikitext2",
                               "--seqlen", "32", "--limit", "2", **offline)  # fmt: skip
    assert evaluated.returncode == 0 and str(folder / "wikitext2" / "wiki.test.raw") in evaluated.stdout
    pruned, _ = streamprune(hub.endpoint, tmp_path / "empty", "run", str(tiny), "--out", str(tmp_path / "out"),
                            "--calib", "c4", *RUN, **offline)  # fmt: skip
    assert pruned.returncode == 0, pruned.stderr
