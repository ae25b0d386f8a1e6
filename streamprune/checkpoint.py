"""Read a local Hugging Face checkpoint lazily: its config and its safetensors tensors, one at a time.

Only the 8-byte length and the JSON header of each shard are parsed up front; a tensor's bytes are
read from disk with plain file reads when asked for and never kept. We parse safetensors ourselves
(the format is a length, a JSON header and raw little-endian bytes) rather than mmap the shards:
mapped pages would stay resident and count against the process for as long as a shard is open.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInputError, UsageError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# the weight dtypes streamprune prunes and computes in (--dtype), by their torch names
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: `nbytes` bytes at absolute offset `start` of `file`."""

    name: str
    file: Path
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header; raises BadInputError naming file and tensor."""
    try:
        file_bytes = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BadInputError(f"{path}: not a safetensors file ({file_bytes} bytes, no header length)")
            header_bytes = int.from_bytes(prefix, "little")
            if header_bytes > min(MAX_HEADER_BYTES, file_bytes - 8):
                raise BadInputError(
                    f"{path}: header claims {header_bytes} bytes but the file has {file_bytes}; "
                    "the file is truncated or not safetensors"
                )
            raw = f.read(header_bytes)
    except OSError as err:
        raise BadInputError(f"cannot read {path}: {err.strerror or err}") from err
    header = parse_json(raw, f"{path}: safetensors header")

    data_start = 8 + header_bytes
    data_bytes = file_bytes - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(path, name, entry, data_start, data_bytes)
    spans = sorted((t.start, t.start + t.nbytes, t.name) for t in tensors.values())
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise BadInputError(f"{path}: tensors {first!r} and {second!r} overlap; the file is corrupt")
    return tensors


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_bytes: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise BadInputError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise BadInputError(f"{where}: unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise BadInputError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise BadInputError(f"{where}: data_offsets {offsets!r} are not two non-negative integers")
    begin, end = offsets
    itemsize = SAFETENSORS_DTYPES[dtype].itemsize
    if end < begin or end > data_bytes:
        raise BadInputError(
            f"{where}: bytes {begin}..{end} run past the end of the data ({data_bytes} bytes); "
            "the file is truncated or corrupt"
        )
    if end - begin != math.prod(shape) * itemsize:
        raise BadInputError(f"{where}: {end - begin} bytes do not hold shape {shape} of {dtype}")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, end - begin)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_json(raw: bytes | str, what: str) -> dict:
    """A JSON object from an untrusted file. Refused, naming `what`: invalid UTF-8 or JSON, nesting
    deep enough to exhaust the parser's recursion, a non-object, and a key given twice (parsers
    disagree on which copy wins, so a duplicated tensor entry could mean different bytes to
    different readers)."""

    def unique_keys(pairs: list[tuple[str, object]]) -> dict:
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise BadInputError(f"{what} names {key!r} twice; the file is corrupt or crafted")
            obj[key] = value
        return obj

    try:
        parsed = json.loads(raw, object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInputError(f"{what} is not valid JSON ({err})") from err
    except RecursionError as err:
        raise BadInputError(f"{what} is nested too deeply to be a real header") from err
    if not isinstance(parsed, dict):
        raise BadInputError(f"{what} is not a JSON object")
    return parsed


class Checkpoint:
    """A local checkpoint directory: `config.json` plus `model.safetensors` or an index and shards.

    Construction reads the config and every shard header, and checks that every tensor the index
    names is where it says. No tensor data is read until `read(name)`.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._check_links()
        self.config = self._read_config()
        self.weight_files, self.tensors = self._read_weights()
        self.bytes_read = 0  # tensor bytes read so far, for reports of I/O
        # {tensor name: digest of its bytes}: when a dict, every whole-tensor read is checked against
        # it (a tensor that changed since it was first read is refused) and adds to it
        self.digests: dict[str, str] | None = None

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def read(self, name: str, rows: slice | None = None, pin: bool = False, count: bool = True) -> torch.Tensor:
        """One tensor, or rows [start, stop) of its first dimension, freshly read into CPU memory
        in its stored dtype (page-locked with `pin`, for fast copies to a GPU). `count`: add its
        bytes to `bytes_read` now (a prefetching reader counts them when it hands them over)."""
        info = self.tensors[name]
        shape, start, nbytes = info.shape, info.start, info.nbytes
        if rows is not None:
            first, last, _ = rows.indices(shape[0])
            row_bytes = nbytes // shape[0] if shape[0] else 0
            shape = (max(0, last - first), *shape[1:])
            start, nbytes = start + first * row_bytes, shape[0] * row_bytes
        data = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        with open(info.file, "rb") as f:
            f.seek(start)
            got = f.readinto(memoryview(data.numpy()))
        if count:
            self.bytes_read += got
        if got != nbytes:
            raise BadInputError(f"{info.file}: tensor {name!r} is truncated ({got} of {nbytes} bytes)")
        if self.digests is not None and rows is None:
            self._check_unchanged(name, hashlib.blake2b(memoryview(data.numpy()), digest_size=16).hexdigest())
        return data.view(info.torch_dtype).reshape(shape)

    def _check_unchanged(self, name: str, digest: str) -> None:
        known = self.digests.setdefault(name, digest)
        if known != digest:
            raise UsageError(
                f"{self.tensors[name].file}: tensor {name!r} is not what this run read from it before: the source "
                "changed after the run started. Going on would mix the old model and the new one. Restore the "
                "source, or start over with --force"
            )

    def _read_config(self) -> dict:
        path = self.directory / "config.json"
        if not path.is_file():
            raise BadInputError(
                f"{self.directory} has no config.json, so it is not a Hugging Face checkpoint. "
                "Pass the directory that holds config.json and the *.safetensors files."
            )
        return parse_json(_read_bytes(path), str(path))

    def _read_weights(self) -> tuple[list[Path], dict[str, TensorInfo]]:
        index_path = self.directory / INDEX_FILE
        single_path = self.directory / SINGLE_FILE
        if index_path.is_file():
            weight_map = self._read_index(index_path)
            files = sorted(set(weight_map.values()))
            headers = {file: read_safetensors_header(self.directory / file) for file in files}
            seen_in: dict[str, str] = {}
            for file in files:
                for name in headers[file]:
                    if name in seen_in:
                        raise BadInputError(
                            f"tensor {name!r} is stored in both {seen_in[name]} and {file} in {self.directory}; "
                            "which copy is meant is ambiguous, so the checkpoint is refused"
                        )
                    seen_in[name] = file
            tensors = {}
            for name, file in weight_map.items():
                if name not in headers[file]:
                    raise BadInputError(
                        f"{index_path} says tensor {name!r} is in {file}, but that file has no such tensor; "
                        "the checkpoint is incomplete or its index is stale"
                    )
                tensors[name] = headers[file][name]
            return [self.directory / f for f in files], tensors
        if single_path.is_file():
            return [single_path], read_safetensors_header(single_path)
        pickles = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
            p.name for p in self.directory.glob("*.pt*")
        )
        if pickles:
            raise BadInputError(
                f"{self.directory} holds only pickle weights ({', '.join(pickles[:3])}); streamprune reads "
                "safetensors only, because loading a pickle can run arbitrary code. If you trust this "
                "checkpoint, convert it once with transformers (load it, then save_pretrained(..., "
                "safe_serialization=True)) and pass the converted directory."
            )
        raise BadInputError(
            f"{self.directory} has no {SINGLE_FILE} and no {INDEX_FILE}; streamprune needs safetensors weights."
        )

    def _read_index(self, index_path: Path) -> dict[str, str]:
        index = parse_json(_read_bytes(index_path), str(index_path))
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise BadInputError(f'{index_path} has no "weight_map" naming the tensors and their shards')
        # plain names only, so every shard is a top-level entry that _check_links has vetted
        for name, file in weight_map.items():
            if not isinstance(file, str) or "\0" in file or Path(file).name != file or file in ("", ".", ".."):
                raise BadInputError(
                    f"{index_path}: tensor {name!r} points at {file!r}; shard names must be plain file "
                    "names inside the checkpoint directory"
                )
            shard = self.directory / file
            if not shard.is_file():
                raise BadInputError(
                    f"{index_path} names shard {file} (for tensor {name!r}), which is missing from "
                    f"{self.directory}; download the complete checkpoint"
                )
        return weight_map

    def _check_links(self) -> None:
        """Refuse a file in the checkpoint that is a symlink to somewhere outside it: config,
        tokenizer and weights are read (and the small files copied into --out) through these names."""
        if not self.directory.is_dir():
            return
        root = self.directory.resolve()
        for path in sorted(self.directory.iterdir()):
            if path.is_symlink() and not path.exists():
                raise BadInputError(f"{path} is a symlink to {os.readlink(path)}, which loops or does not exist")
            if path.is_symlink() and not _inside(path, root):
                raise BadInputError(
                    f"{path} is a symlink to {os.readlink(path)}, outside the checkpoint directory; streamprune "
                    "only reads files that live in the checkpoint. Copy the file in if you trust it."
                )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise BadInputError(f"cannot read {path}: {err.strerror or err}") from err


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks followed, is in the directory `root` (already resolved), or is a
    Hugging Face cache snapshot's link into its own repository's blobs/ folder."""
    try:
        return root in path.resolve().parents or _is_hub_blob(path)
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _is_hub_blob(path: Path) -> bool:
    """Hugging Face cache snapshots are symlinks into the repository's own blobs/ folder."""
    snapshots = path.parent.parent
    return snapshots.name == "snapshots" and path.resolve().parent == (snapshots.parent / "blobs").resolve()
