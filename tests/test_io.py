"""The safetensors reader and the planned shard writer, checked against the safetensors library."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamprune import buffers
from streamprune.checkpoint import DTYPE_NAMES, Checkpoint, read_safetensors_header
from streamprune.errors import BadInputError, UsageError
from streamprune.sizes import parse_size
from streamprune.writer import CheckpointWriter, plan_shards

TENSORS = {
    "a": torch.randn(3, 5),
    "b": torch.randn(7).to(torch.bfloat16),
    "c": torch.arange(12, dtype=torch.int64).reshape(3, 4),
    "d": torch.randn(2, 2).half(),
    "e": torch.tensor(1.5),
}


def test_reader_reads_what_safetensors_wrote(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text("{}")
    checkpoint = Checkpoint(tmp_path)
    for name, tensor in TENSORS.items():
        read = checkpoint.read(name)
        assert read.dtype == tensor.dtype and torch.equal(read, tensor)


def test_writer_output_reads_back_with_safetensors(tmp_path):
    plan = [
        (
            n,
            {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.float16: "F16"}[t.dtype],
            tuple(t.shape),
        )
        for n, t in TENSORS.items()
    ]
    writer = CheckpointWriter(tmp_path, plan, max_shard_bytes=150)
    for name, tensor in TENSORS.items():
        writer.write(name, tensor)
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(writer.files) > 1
    loaded = {}
    for file in writer.files:
        assert (tmp_path / file).stat().st_size <= 150 or len(load_file(tmp_path / file)) == 1
        loaded.update(load_file(tmp_path / file))
    assert set(loaded) == set(TENSORS) == set(index["weight_map"])
    for name, tensor in TENSORS.items():
        assert torch.equal(loaded[name], tensor)


def test_writer_refuses_out_of_order_and_names_nothing_final_until_complete(tmp_path):
    writer = CheckpointWriter(tmp_path, [("a", "F32", (3, 5)), ("b", "F32", (2,))], max_shard_bytes=10**6)
    with pytest.raises(RuntimeError):
        writer.write("b", torch.zeros(2))
    writer.write("a", TENSORS["a"])
    assert list(tmp_path.iterdir()) == [tmp_path / ".model-00001-of-00001.safetensors.partial"]
    writer.abort()  # the partial stays, for a resumed run to continue
    assert list(tmp_path.iterdir()) == [tmp_path / ".model-00001-of-00001.safetensors.partial"]


@pytest.mark.parametrize("lost", ["d", "de"])  # lost after the resume point: part of a shard, or its seal
def test_resumed_writer_writes_the_same_bytes(tmp_path, lost):
    plan = [(name, DTYPE_NAMES[t.dtype], tuple(t.shape)) for name, t in TENSORS.items()]  # shards: ab, cde

    def write(writer, selected):
        for name in selected:
            writer.write(name, TENSORS[name])

    (tmp_path / "whole").mkdir()
    whole = CheckpointWriter(tmp_path / "whole", plan, max_shard_bytes=400)
    write(whole, "abcde")
    whole.finish()

    (tmp_path / "resumed").mkdir()
    first = CheckpointWriter(tmp_path / "resumed", plan, max_shard_bytes=400)
    write(first, "abc")
    position = json.loads(json.dumps(first.position()))  # it goes through the JSON state file
    assert position["partial"] is not None and list(position["sealed"]) == ["model-00001-of-00002.safetensors"]
    write(first, lost)  # written after the resume point, then lost
    if first._file is not None:
        first._file.write(b"half of a tensor")
    first.abort()
    second = CheckpointWriter(tmp_path / "resumed", plan, max_shard_bytes=400)
    second.resume(position)
    write(second, "de")
    second.finish()
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    assert second.sealed == whole.sealed


def test_resume_refuses_a_partial_shard_that_changed(tmp_path):
    plan = [(name, DTYPE_NAMES[t.dtype], tuple(t.shape)) for name, t in TENSORS.items()]
    writer = CheckpointWriter(tmp_path, plan, max_shard_bytes=10**6)
    writer.write("a", TENSORS["a"])
    position = writer.position()
    writer.abort()
    partial = tmp_path / ".model-00001-of-00001.safetensors.partial"
    data = bytearray(partial.read_bytes())
    data[-1] ^= 1
    partial.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match="does not hold the bytes"):
        CheckpointWriter(tmp_path, plan, max_shard_bytes=10**6).resume(position)


def test_plan_shards_fills_in_order():
    plan = plan_shards([(f"t{i}", "F32", (100,)) for i in range(10)], max_shard_bytes=1000)
    assert [list(s.entries) for s in plan][0] == ["t0", "t1"]  # 400 data bytes each + header
    assert sum(len(s.entries) for s in plan) == 10
    assert plan[-1].file == f"model-{len(plan):05d}-of-{len(plan):05d}.safetensors"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5kb") == 1500
    for bad in ("five", "-1GB", "0"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_header_longer_than_file_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(BadInputError, match="header claims 1000000 bytes"):
        read_safetensors_header(path)


def test_truncated_shard_is_refused_at_header_time(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(BadInputError, match="run past the end"):
        read_safetensors_header(tmp_path / "model.safetensors")


def test_read_rows_reads_a_slice_of_the_first_dimension(tmp_path):
    table = torch.randn(10, 3)
    save_file({"t": table}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    checkpoint = Checkpoint(tmp_path)
    assert torch.equal(checkpoint.read("t", rows=slice(2, 7)), table[2:7])
    assert torch.equal(checkpoint.read("t", rows=slice(8, 20)), table[8:])


def test_embedding_in_slices_equals_a_lookup(tiny_llama, monkeypatch, tmp_path):
    import streamprune.stream as stream

    checkpoint = Checkpoint(tiny_llama)
    ids = torch.randint(0, 512, (3, 17), generator=torch.Generator().manual_seed(0))
    EMBEDDING = "model.embed_tokens.weight"
    expected = torch.nn.functional.embedding(ids, checkpoint.read(EMBEDDING))
    monkeypatch.setattr(buffers, "EMBEDDING_SLICE_BYTES", 64 * 4 * 37)  # 37 rows per slice
    assert torch.equal(stream.embed(checkpoint, EMBEDDING, ids, torch.float32), expected)
    monkeypatch.setattr(buffers, "OFFLOADED_TOKENS_PER_COPY", 5)  # runs of 5 tokens into a file-backed buffer
    offloaded = buffers.activation_buffer((3, 17, 64), torch.float32, tmp_path)
    assert torch.equal(stream.embed(checkpoint, EMBEDDING, ids, torch.float32, out=offloaded), expected)


def test_an_offloaded_buffer_is_known_as_such_through_its_views(tmp_path):
    """eval embeds into `hidden.unsqueeze(0)`: the view must be released like the buffer itself."""
    buffer = buffers.activation_buffer((6, 5), torch.float32, tmp_path)
    assert buffers.is_offloaded(buffer) and buffers.is_offloaded(buffer.unsqueeze(0))
    assert buffers.is_offloaded(buffer[2:4]) and not buffers.is_offloaded(torch.empty(6, 5))
    buffer.fill_(3.0)
    buffers.release(buffer.unsqueeze(0))  # dropped from memory, not from the file
    assert torch.equal(buffer, torch.full((6, 5), 3.0))
