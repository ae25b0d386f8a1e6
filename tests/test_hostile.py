"""Hostile and broken inputs: a checkpoint from a stranger must not hurt the user.

Every case breaks a private copy of the tiny Llama (or passes a bad flag), runs the real CLI in
process, and asserts four things: the exact exit code; a message that names the problem (the file
and tensor where there is one); that nothing was created or changed outside --out; and that the
source is byte-for-byte what it was after the breakage. Cases that are found by validation must
also leave --out uncreated; the numeric cases stop mid-run and must leave no index (no model that
loads) and a resumable run state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
from conftest import WIKITEXT, tree_digest
from typer.testing import CliRunner

from streamprune.cli import app

FAST = ["--calib", str(WIKITEXT), "--nsamples", "4", "--seqlen", "32", "--quiet"]
INDEX = "model.safetensors.index.json"
CASES = []


def case(exit_code: int, *phrases: str, validation: bool = True, command: str = "run"):
    """Register a breaker: fn(model, outside) -> extra CLI arguments (or None)."""

    def register(fn):
        CASES.append(pytest.param(fn, exit_code, phrases, validation, command, id=fn.__name__))
        return fn

    return register


# -- helpers that break things ----------------------------------------------------------------


def shard_of(model: Path, tensor: str) -> Path:
    return model / json.loads((model / INDEX).read_text())["weight_map"][tensor]


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(path: Path, header: dict | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def edit_header(model: Path, tensor: str, edit) -> Path:
    """Apply edit(header, entry) to the header entry of `tensor` in its shard; returns the shard."""
    path = shard_of(model, tensor)
    header, data = read_safetensors(path)
    edit(header, header[tensor])
    write_safetensors(path, header, data)
    return path


def set_tensor(model: Path, tensor: str, value: float, count: int = 3) -> None:
    """Overwrite the first `count` float32 values of `tensor` with `value`."""
    path = shard_of(model, tensor)
    header, data = read_safetensors(path)
    begin = header[tensor]["data_offsets"][0]
    patch = struct.pack(f"<{count}f", *[value] * count)
    write_safetensors(path, header, data[:begin] + patch + data[begin + len(patch) :])


Q = "model.layers.1.self_attn.q_proj.weight"
K = "model.layers.1.self_attn.k_proj.weight"


# -- safetensors files --------------------------------------------------------------------------


@case(3, "{Q_SHARD}", Q, "truncated")
def truncated_shard(model, outside):
    path = shard_of(model, Q)
    path.write_bytes(path.read_bytes()[:-100])


@case(3, "{Q_SHARD}", "header claims", "truncated or not safetensors")
def header_length_exceeds_file(model, outside):
    path = shard_of(model, Q)
    raw = path.read_bytes()
    path.write_bytes((2**40).to_bytes(8, "little") + raw[8:])


@case(3, "not a safetensors file", "no header length")
def file_shorter_than_a_header_length(model, outside):
    shard_of(model, Q).write_bytes(b"abc")


@case(3, "safetensors header is not valid JSON")
def header_not_json(model, outside):
    write_safetensors(shard_of(model, Q), b"{this is not json" + b" " * 16, b"")


@case(3, "safetensors header is not a JSON object")
def header_is_a_list(model, outside):
    write_safetensors(shard_of(model, Q), b"[1, 2, 3]", b"")


@case(3, "nested too deeply")
def header_nested_to_exhaust_the_parser(model, outside):
    write_safetensors(shard_of(model, Q), b"[" * 100_000 + b"]" * 100_000, b"")


@case(3, "names", Q, "twice")
def header_names_a_tensor_twice(model, outside):
    path = shard_of(model, Q)
    header, data = read_safetensors(path)
    text = json.dumps(header)
    entry = json.dumps({Q: header[Q]})[1:-1]
    write_safetensors(path, ("{" + entry + ", " + text[1:]).encode(), data)


@case(3, "overlap", "corrupt")
def tensors_overlap(model, outside):
    def edit(header, entry):
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        start = min(e["data_offsets"][0] for n, e in header.items() if n not in (Q, "__metadata__"))
        entry["data_offsets"] = [start, start + size]  # same length, so only the overlap is wrong

    edit_header(model, Q, edit)


@case(3, Q, "run past the end")
def offsets_past_the_end(model, outside):
    edit_header(model, Q, lambda header, entry: entry.update(data_offsets=[entry["data_offsets"][0], 10**12]))


@case(3, Q, "two non-negative integers")
def negative_offsets(model, outside):
    edit_header(model, Q, lambda header, entry: entry.update(data_offsets=[-8, entry["data_offsets"][1]]))


@case(3, Q, "do not hold shape")
def shape_disagrees_with_its_bytes(model, outside):
    edit_header(model, Q, lambda header, entry: entry.update(shape=[64, 65]))


@case(3, Q, "unsupported dtype")
def unknown_dtype(model, outside):
    edit_header(model, Q, lambda header, entry: entry.update(dtype="F4_E9"))


@case(3, Q, "is not a list of non-negative integers")
def boolean_shape(model, outside):
    edit_header(model, Q, lambda header, entry: entry.update(shape=[True, 4096]))


@case(3, K, "has shape [64, 32]", "config.json implies [32, 64]")
def k_proj_transposed(model, outside):
    edit_header(model, K, lambda header, entry: entry.update(shape=entry["shape"][::-1]))


@case(3, Q, "stored as I32", "not quantized or integer")
def integer_layer_weight(model, outside):
    edit_header(model, Q, lambda header, entry: entry.update(dtype="I32"))


# -- the index and the directory ----------------------------------------------------------------


@case(3, "model.layers.1.mlp.extra.weight", "no such tensor")
def index_names_a_tensor_its_shard_lacks(model, outside):
    edit_json(model / INDEX, lambda i: i["weight_map"].update({"model.layers.1.mlp.extra.weight": i["weight_map"][Q]}))


@case(3, "missing", "download the complete checkpoint")
def index_names_a_missing_shard(model, outside):
    shard_of(model, K).unlink()


@case(3, Q, "stored in both", "ambiguous")
def tensor_in_two_shards(model, outside):
    from safetensors.torch import load_file, save_file

    tensors = {Q: load_file(shard_of(model, Q))[Q], "model.extra": load_file(shard_of(model, Q))[Q][:1].clone()}
    save_file(tensors, model / "model-extra.safetensors", metadata={"format": "pt"})
    edit_json(model / INDEX, lambda i: i["weight_map"].update({"model.extra": "model-extra.safetensors"}))


@case(3, "plain file names")
def index_shard_absolute_path(model, outside):
    target = outside / "evil.safetensors"
    shutil.copy(shard_of(model, Q), target)
    edit_json(model / INDEX, lambda i: i["weight_map"].update({Q: str(target)}))


@case(3, "plain file names")
def index_shard_parent_traversal(model, outside):
    shutil.copy(shard_of(model, Q), outside / "evil.safetensors")
    edit_json(model / INDEX, lambda i: i["weight_map"].update({Q: "../outside/evil.safetensors"}))


@case(3, "plain file names")
def index_shard_not_a_string(model, outside):
    edit_json(model / INDEX, lambda i: i["weight_map"].update({Q: 7}))


@case(3, "symlink", "outside the checkpoint directory")
def shard_symlinked_outside(model, outside):
    shard = shard_of(model, Q)
    shutil.move(shard, outside / shard.name)
    shard.symlink_to(outside / shard.name)


@case(3, "tokenizer.json", "symlink", "outside the checkpoint directory")
def tokenizer_symlinked_to_a_secret(model, outside):
    (outside / "secret.txt").write_text("a private key")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(outside / "secret.txt")


@case(3, "symlink", "loops or does not exist")
def shard_symlink_loop(model, outside):
    shard = shard_of(model, Q)
    shard.unlink()
    shard.symlink_to(shard.name)


@case(3, INDEX, "not valid JSON")
def index_not_json(model, outside):
    (model / INDEX).write_text('{"weight_map": ')


@case(3, "weight_map")
def index_without_weight_map(model, outside):
    edit_json(model / INDEX, lambda i: i.pop("weight_map"))


@case(3, "pickle", "arbitrary code", "safetensors")
def pickle_only_checkpoint(model, outside):
    for path in [*model.glob("*.safetensors"), model / INDEX]:
        path.unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")


# -- config.json ------------------------------------------------------------------------------


@case(3, "no config.json")
def no_config(model, outside):
    (model / "config.json").unlink()


@case(3, "config.json is not valid JSON")
def config_not_json(model, outside):
    (model / "config.json").write_text("{not json")


@case(3, "num_hidden_layers=None")
def config_without_layer_count(model, outside):
    edit_json(model / "config.json", lambda c: c.pop("num_hidden_layers"))


@case(3, "model.layers.2.mlp.down_proj.weight", "incomplete")
def layer_tensor_absent(model, outside):
    edit_json(model / INDEX, lambda i: i["weight_map"].pop("model.layers.2.mlp.down_proj.weight"))


@case(3, "config.json is not a JSON object")
def config_is_a_list(model, outside):
    (model / "config.json").write_text("[]")


@case(3, "custom modeling code", "never runs")
def config_asks_for_remote_code(model, outside):
    edit_json(model / "config.json", lambda c: c.update(auto_map={"AutoModelForCausalLM": "evil.Model"}))


@case(3, "unsupported architecture", "LlamaForCausalLM")
def unsupported_architecture(model, outside):
    edit_json(model / "config.json", lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))


@case(3, "hidden_size=1000000000", "1 to 131,072")
def absurd_hidden_size(model, outside):
    edit_json(model / "config.json", lambda c: c.update(hidden_size=10**9))


@case(3, "num_hidden_layers=1000000")
def absurd_layer_count(model, outside):
    edit_json(model / "config.json", lambda c: c.update(num_hidden_layers=10**6))


@case(3, "intermediate_size=-128")
def negative_intermediate_size(model, outside):
    edit_json(model / "config.json", lambda c: c.update(intermediate_size=-128))


@case(3, "num_hidden_layers='3'")
def layer_count_as_a_string(model, outside):
    edit_json(model / "config.json", lambda c: c.update(num_hidden_layers="3"))


@case(3, "num_attention_heads=4 and num_key_value_heads=3", "multiple")
def heads_not_a_multiple_of_kv_heads(model, outside):
    edit_json(model / "config.json", lambda c: c.update(num_key_value_heads=3))


# -- numbers inside the tensors (found mid-run: the run state is kept, no model is written) ------


@case(3, "model.layers.1.mlp.up_proj.weight", "3 NaN", "Layers 0-0 are saved", validation=False)
def nan_weights(model, outside):
    set_tensor(model, "model.layers.1.mlp.up_proj.weight", math.nan)


@case(3, "model.embed_tokens.weight", "2 Inf", "No layer was saved", validation=False)
def inf_in_the_embedding(model, outside):
    set_tensor(model, "model.embed_tokens.weight", math.inf, count=2)


@case(3, "outputs of layer 1", "Inf", "Layers 0-0 are saved", validation=False)
def activations_overflow_after_a_layer(model, outside):
    tensor = "model.layers.1.post_attention_layernorm.weight"
    set_tensor(model, tensor, 3e38, count=64)


@case(3, "model.layers.2.self_attn.o_proj.weight", "1 NaN", command="eval")
def eval_refuses_nan_weights(model, outside):
    set_tensor(model, "model.layers.2.self_attn.o_proj.weight", math.nan, count=1)


# -- the command line and --out -----------------------------------------------------------------


@case(2, "inside the source directory")
def out_symlinked_into_the_source(model, outside):
    (model / "sub").mkdir()
    (outside / "out-link").symlink_to(model / "sub")
    return ["--out", outside / "out-link"]


@case(2, "exists and is a file")
def out_is_a_file(model, outside):
    (outside / "a-file").write_text("keep me")
    return ["--out", outside / "a-file"]


@case(2, "--nsamples")
def zero_samples(model, outside):
    return ["--nsamples", "0"]


@case(2, "--max-shard-size")
def shard_size_not_a_size(model, outside):
    return ["--max-shard-size", "lots"]


@case(2, "--device")
def unknown_device(model, outside):
    return ["--device", "tpu"]


@case(2, "--dtype")
def integer_compute_dtype(model, outside):
    return ["--dtype", "int8"]


@case(2, "No such option")
def unknown_flag(model, outside):
    return ["--prune-harder"]


# -- the same validation guards `eval` ------------------------------------------------------------


@case(3, Q, "run past the end", command="eval")
def eval_refuses_a_corrupt_header(model, outside):
    offsets_past_the_end(model, outside)


@case(3, "symlink", "outside the checkpoint directory", command="eval")
def eval_refuses_a_symlinked_shard(model, outside):
    shard_symlinked_outside(model, outside)


def listing(root: Path, skip: Path) -> dict[str, str]:
    """Every path under root except `skip`'s subtree, with its sha256 (or "dir"/"link")."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path == skip or skip in path.parents:
            continue
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("breaker,exit_code,phrases,validation,command", CASES)
def test_hostile_input(tiny_llama, tmp_path, breaker, exit_code, phrases, validation, command):
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    q_shard = shard_of(model, Q).name  # "{Q_SHARD}" in a phrase: the file the error must name
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    extra = [str(a) for a in (breaker(model, outside) or [])]
    source_before = tree_digest(model)
    world_before = listing(tmp_path, skip=out)
    if "--out" in extra:
        out = Path(extra[extra.index("--out") + 1])
    if command == "run":
        args = ["run", str(model), *(["--out", str(out)] if "--out" not in extra else []), *FAST, *extra]
    else:
        args = ["eval", str(model), "--ppl", str(WIKITEXT), "--seqlen", "32", "--limit", "2", *extra]

    result = CliRunner().invoke(app, args)

    assert result.exit_code == exit_code, result.output
    message = " ".join(result.output.split())  # undo line wrapping
    for phrase in phrases:
        assert phrase.replace("{Q_SHARD}", q_shard) in message, result.output
    assert "Traceback" not in result.output
    assert tree_digest(model) == source_before, "the source was modified"
    assert listing(tmp_path, skip=tmp_path / "out") == world_before, "something outside --out changed"
    if validation:
        assert not (tmp_path / "out").exists(), "a run refused at validation must not create --out"
    else:
        assert not (out / INDEX).exists(), "a model with non-finite numbers must never be completed"
        assert (out / ".streamprune" / "state.json").is_file(), "the run state must be kept"


def test_the_suite_has_the_cases_the_readme_claims():
    assert len(CASES) >= 50  # "over fifty ways" (the issue asked for at least 30)
