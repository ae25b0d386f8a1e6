"""Property-based fuzzing of the code that parses untrusted bytes: safetensors headers and the
shard index. Whatever the input, the result is either a parse whose every tensor lies inside its
file (and, for the index, inside the checkpoint directory) or a BadInputError; never another
exception, a hang, or an allocation sized by the input.

The number of examples per property is bounded for CI (STREAMPRUNE_FUZZ_EXAMPLES, default 300;
the whole file takes about half a minute); raise it for a longer local hunt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from streamprune.checkpoint import INDEX_FILE, SAFETENSORS_DTYPES, SINGLE_FILE, Checkpoint, read_safetensors_header
from streamprune.errors import BadInputError

EXAMPLES = int(os.environ.get("STREAMPRUNE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
dtype_names = st.sampled_from([*SAFETENSORS_DTYPES, "F4", "f32", "", "Q4_K"]) | json_values
small_ints = st.integers(-3, 40) | st.booleans() | st.integers(-(2**64), 2**64)


@st.composite
def near_valid_headers(draw) -> dict:
    """Headers shaped like real ones, with every field free to be wrong."""
    header = {}
    for i in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([f"t{i}", "__metadata__", "model.layers.0.mlp.up_proj.weight"]))
        entry = {
            "dtype": draw(dtype_names),
            "shape": draw(st.lists(small_ints, max_size=3) | json_values),
            "data_offsets": draw(st.lists(small_ints, min_size=0, max_size=3) | json_values),
        }
        for key in draw(st.sets(st.sampled_from(list(entry)), max_size=1)):
            del entry[key]
        header[name] = entry
    return header


@st.composite
def safetensors_bytes(draw) -> bytes:
    """A length prefix (right, or anything), a header (random JSON, near-valid, or undecodable),
    and some data."""
    kind = draw(st.sampled_from(["json", "near-valid", "raw"]))
    if kind == "raw":
        header = draw(st.binary(max_size=64))
    else:
        value = draw(json_values) if kind == "json" else draw(near_valid_headers())
        header = json.dumps(value).encode()
    data = draw(st.binary(max_size=96))
    length = draw(st.one_of(st.just(len(header)), st.integers(0, 2**64 - 1), st.integers(0, len(header) + 8)))
    return length.to_bytes(8, "little") + header + data


@st.composite
def mutated_real_files(draw) -> bytes:
    """A real file written by the safetensors library, then truncated, bit-flipped or spliced."""
    tensors = {}
    for i in range(draw(st.integers(1, 3))):
        shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int8, torch.float16]))
        tensors[f"w{i}"] = torch.arange(int(torch.tensor(shape).prod()) if shape else 1).reshape(shape).to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, Path(tmp) / "x.safetensors", metadata={"format": "pt"})
        raw = bytearray((Path(tmp) / "x.safetensors").read_bytes())
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del raw[at:]
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif raw:
            del raw[at : at + draw(st.integers(1, 4))]
    return bytes(raw)


def parse_file(raw: bytes):
    """(our parse or the BadInputError, a Checkpoint over the file or None), in a fresh directory."""
    tmp = Path(tempfile.mkdtemp())
    try:
        (tmp / "config.json").write_text("{}")
        path = tmp / SINGLE_FILE
        path.write_bytes(raw)
        try:
            tensors = read_safetensors_header(path)
        except BadInputError as err:
            assert str(err).startswith(str(path)), "the error must name the file"
            return err, None, None
        check_inside_file(tensors, len(raw))
        checkpoint = Checkpoint(tmp)
        ours = {name: checkpoint.read(name) for name in tensors}  # every accepted tensor is readable
        theirs = None
        try:
            with safe_open(str(path), "pt") as f:
                theirs = {name: f.get_tensor(name) for name in f.keys()}
        except Exception:  # the reference library is stricter (it refuses gaps between tensors)
            pass
        return tensors, ours, theirs
    finally:
        shutil.rmtree(tmp)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def check_inside_file(tensors: dict, file_bytes: int) -> None:
    spans = sorted((t.start, t.start + t.nbytes) for t in tensors.values())
    for start, end in spans:
        assert 8 <= start <= end <= file_bytes
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, "accepted tensors must not overlap"
    for t in tensors.values():
        numel = 1
        for d in t.shape:
            numel *= d
        assert t.nbytes == numel * SAFETENSORS_DTYPES[t.dtype].itemsize


@FUZZ
@given(safetensors_bytes())
def test_header_parser_refuses_cleanly_or_parses_consistently(raw):
    parse_file(raw)


@FUZZ
@given(mutated_real_files())
def test_mutated_real_files_parse_as_the_reference_library_reads_them(raw):
    tensors, ours, theirs = parse_file(raw)
    if theirs is not None and not isinstance(tensors, BadInputError):
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(as_bytes(ours[name]), as_bytes(theirs[name])), name
    if theirs is not None:
        assert not isinstance(tensors, BadInputError), f"the reference library reads it, we refused: {tensors}"


def test_mutation_strategy_reaches_both_outcomes():
    """Guard against a fuzzer that only ever hits the error path (or never does)."""
    outcomes = set()

    @settings(max_examples=150, deadline=None, database=None)
    @given(mutated_real_files())
    def probe(raw):
        outcomes.add(isinstance(parse_file(raw)[0], BadInputError))

    probe()
    assert outcomes == {True, False}


# -- the index ------------------------------------------------------------------------------------

shard_names = st.sampled_from(
    [
        "a.safetensors",
        "b.safetensors",
        "missing.safetensors",
        "../outside.safetensors",
        "/etc/passwd",
        "sub/a.safetensors",
        "link-out.safetensors",
        "loop.safetensors",
        "",
        ".",
        "..",
        "a.safetensors\0",
        "config.json",
    ]
)
weight_maps = st.dictionaries(
    st.sampled_from(["w0", "w1", "w2", "x"]) | st.text(max_size=6), shard_names | json_values, max_size=5
)
indexes = st.one_of(
    st.builds(lambda m: {"metadata": {"total_size": 1}, "weight_map": m}, weight_maps),
    json_values,
)


@pytest.fixture(scope="module")
def index_template(tmp_path_factory) -> Path:
    """Two real shards (sharing the name w1), a copy of one in a subdirectory, and a shard outside
    the directory; each example copies it and may add a symlink out and a symlink loop."""
    root = tmp_path_factory.mktemp("index")
    save_file({"w0": torch.ones(2), "w1": torch.zeros(3)}, root / "a.safetensors", metadata={"format": "pt"})
    save_file({"w2": torch.ones(4), "w1": torch.ones(1)}, root / "b.safetensors", metadata={"format": "pt"})
    (root / "sub").mkdir()
    shutil.copy(root / "a.safetensors", root / "sub" / "a.safetensors")
    (root / "config.json").write_text("{}")
    (root.parent / "outside.safetensors").write_bytes((root / "a.safetensors").read_bytes())
    return root


@FUZZ
@given(index=indexes, links=st.booleans())
def test_index_parser_refuses_cleanly_or_stays_inside_the_directory(index_template, index, links):
    tmp = Path(tempfile.mkdtemp())
    try:
        model = Path(shutil.copytree(index_template, tmp / "model"))
        shutil.copy(index_template.parent / "outside.safetensors", tmp / "outside.safetensors")
        if links:
            (model / "link-out.safetensors").symlink_to(tmp / "outside.safetensors")
            (model / "loop.safetensors").symlink_to("loop.safetensors")
        (model / INDEX_FILE).write_text(json.dumps(index))
        try:
            checkpoint = Checkpoint(model)
        except BadInputError:
            return
        root = model.resolve()
        for info in checkpoint.tensors.values():
            assert info.file.resolve().parent == root, f"{info.file} is outside {root}"
        for name in checkpoint.tensors:
            checkpoint.read(name)
    finally:
        shutil.rmtree(tmp)
