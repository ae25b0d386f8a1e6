"""Write a sharded safetensors checkpoint tensor by tensor, without holding a shard in memory.

Pruning changes values, never names, shapes or dtypes, so the whole output layout (which tensor
goes in which shard, at which offset) is planned before the first byte is written. Each shard's
header can then be written first and its tensors streamed in after it. A shard is written under a
temporary name and renamed only when complete and fsynced; the index is written last.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import DTYPE_NAMES, INDEX_FILE, SAFETENSORS_DTYPES
from .errors import UsageError

_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000 (transformers' max_shard_size spelling)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not match:
        raise UsageError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    number, unit = match.groups()
    size = int(float(number) * _SIZE_UNITS[unit or "B"])
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size


@dataclass
class _Shard:
    file: str
    entries: dict[str, dict] = field(default_factory=dict)  # name -> {"dtype","shape","data_offsets"}
    data_bytes: int = 0

    def header(self) -> bytes:
        header = {"__metadata__": {"format": "pt"}, **self.entries}
        raw = json.dumps(header, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it


def plan_shards(tensors: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int) -> list[_Shard]:
    """Assign (name, dtype, shape) in write order to shards no larger than max_shard_bytes on disk.

    A single tensor larger than the limit gets a shard of its own (as transformers does).
    """
    shards: list[_Shard] = []
    current = _Shard("")
    overhead = 8 + len(current.header())
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        entry = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [current.data_bytes, current.data_bytes + nbytes],
        }
        # each entry's own JSON, braces included, bounds what it adds to the header
        entry_bytes = len(json.dumps({name: entry}, separators=(",", ":"))) + 8
        if current.entries and overhead + entry_bytes + current.data_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current = _Shard("")
            overhead = 8 + len(current.header())
            entry["data_offsets"] = [0, nbytes]
            entry_bytes = len(json.dumps({name: entry}, separators=(",", ":"))) + 8
        current.entries[name] = entry
        current.data_bytes += nbytes
        overhead += entry_bytes
    if current.entries:
        shards.append(current)
    for number, shard in enumerate(shards, start=1):
        shard.file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
    return shards


class CheckpointWriter:
    """Streams tensors into planned shards in `out_dir`; call `write` in plan order, then `finish`.

    Files appear under their final names only when complete. `abort()` removes the partial shard.
    """

    def __init__(self, out_dir: Path, tensors: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(tensors, max_shard_bytes)
        self._order = [(shard, name) for shard in self.shards for name in shard.entries]
        self._next = 0
        self._file = None  # open temp file of the shard being written
        self._temp_path: Path | None = None

    @property
    def files(self) -> list[str]:
        return [shard.file for shard in self.shards]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, expected = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"writer expected tensor {expected!r} next, got {name!r}")
        entry = shard.entries[name]
        if DTYPE_NAMES.get(tensor.dtype) != entry["dtype"] or list(tensor.shape) != entry["shape"]:
            raise RuntimeError(f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, planned {entry}")
        if self._file is None:
            self._temp_path = self.out_dir / f".{shard.file}.partial"
            self._file = open(self._temp_path, "wb")
            header = shard.header()
            self._file.write(len(header).to_bytes(8, "little"))
            self._file.write(header)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] is not shard:
            self._seal(shard)

    def finish(self) -> None:
        """Write the index (last, atomically) once every planned tensor has been written."""
        if self._next != len(self._order):
            raise RuntimeError(f"writer finished after {self._next} of {len(self._order)} tensors")
        weight_map = {name: shard.file for shard in self.shards for name in shard.entries}
        index = {
            "metadata": {"total_size": sum(shard.data_bytes for shard in self.shards)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        write_atomic(self.out_dir / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._temp_path.unlink(missing_ok=True)

    def _seal(self, shard: _Shard) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._temp_path, self.out_dir / shard.file)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete: temp, fsync, rename."""
    temp = path.with_name(f".{path.name}.partial")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
