"""Standard data by name: `--ppl wikitext2` from the data folder (STREAMPRUNE_DATA) or the hub's
parquet rows, rebuilt into the official text; offline with a cold cache, a message in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import C4, DATA, WIKITEXT
from typer.testing import CliRunner

from streamprune.cli import app
from streamprune.data import WIKITEXT2_ROWS, rows_to_raw, wikitext_from_parquet
from streamprune.errors import EXIT_RESOURCES

ROWS = DATA / "wikitext2" / "wiki.test.hf_rows.jsonl"


def test_the_hub_rows_rebuild_the_official_text_byte_for_byte(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    rows = [json.loads(line)["text"] for line in ROWS.read_text().splitlines()]
    assert len(rows) == WIKITEXT2_ROWS
    assert rows_to_raw(rows) == WIKITEXT.read_text()
    path = tmp_path / "test-00000-of-00001.parquet"
    parquet.write_table(pyarrow.table({"text": rows}), path)
    assert wikitext_from_parquet(path) == WIKITEXT.read_text()
    parquet.write_table(pyarrow.table({"text": rows[:10]}), path)
    with pytest.raises(Exception, match="10 rows"):
        wikitext_from_parquet(path)


def test_wikitext2_by_name_is_the_data_folders_copy(tiny_llama, tmp_path, monkeypatch):
    """The same perplexity as the file itself; the record says where the text came from."""
    monkeypatch.setenv("STREAMPRUNE_DATA", str(DATA))
    by_name, by_file = tmp_path / "name.json", tmp_path / "file.json"
    common = ["--limit", "3", "--seqlen", "64", "--quiet"]
    for ppl, output in (("wikitext2", by_name), (str(WIKITEXT), by_file)):
        result = CliRunner().invoke(app, ["eval", str(tiny_llama), "--ppl", ppl, *common, "--output", str(output)])
        assert result.exit_code == 0, result.output
    name, file = (json.loads(p.read_text())["perplexity"] for p in (by_name, by_file))
    assert name["ppl"] == file["ppl"] and name["file"] == str(DATA / "wikitext2" / "wiki.test.raw")


def test_offline_with_a_cold_cache_says_what_to_set(tiny_llama, tmp_path, monkeypatch):
    env = {**os.environ, "STREAMPRUNE_DATA": "", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    # no hang: the message comes as soon as the program is up (test_hub.py times it against 10 s from
    # there; a whole process's start alone takes seconds on a busy machine)
    done = subprocess.run([sys.executable, "-m", "streamprune", "eval", str(tiny_llama), "--ppl", "wikitext2"],
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert done.returncode == EXIT_RESOURCES, done.stderr
    assert "STREAMPRUNE_DATA" in done.stderr and "Traceback" not in done.stderr
    # fetch-data, offline: the same message, and nothing half-made in the folder
    monkeypatch.setattr("streamprune.data.hub_reachable", lambda: False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    fetched = CliRunner().invoke(app, ["fetch-data", str(tmp_path / "data")])
    assert fetched.exit_code == EXIT_RESOURCES and "STREAMPRUNE_DATA" in fetched.output, fetched.output
    assert not (tmp_path / "data" / "wikitext2").exists()


def test_a_data_folder_that_is_not_there_is_named(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMPRUNE_DATA", str(tmp_path / "no"))
    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "--ppl", "wikitext2", "--quiet"])
    assert result.exit_code == 2 and "STREAMPRUNE_DATA=" in result.output and "fetch-data" in result.output


def test_calib_c4_reads_the_data_folders_shard_first_and_offline_names_the_setting(tmp_path, monkeypatch):
    from streamprune.calibration import calibration_path
    from streamprune.data import C4_FILE
    from streamprune.errors import ResourceError

    monkeypatch.setattr("streamprune.data.hub_reachable", lambda: False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "data" / "c4").mkdir(parents=True)
    monkeypatch.setenv("STREAMPRUNE_DATA", str(tmp_path / "data"))
    with pytest.raises(ResourceError, match=f"STREAMPRUNE_DATA to a folder holding {C4_FILE}"):
        calibration_path("c4")
    (tmp_path / "data" / C4_FILE).write_bytes(C4.read_bytes())
    assert calibration_path("c4") == tmp_path / "data" / C4_FILE
