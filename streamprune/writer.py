"""Write a sharded safetensors checkpoint tensor by tensor, without holding a shard in memory.

Pruning changes values, never names, shapes or dtypes, so the whole output layout (which tensor
goes in which shard, at which offset) is planned before the first byte is written. Each shard's
header can then be written first and its tensors streamed in after it. A shard is written under a
temporary name and renamed only when complete and fsynced; the index is written last.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import DTYPE_NAMES, INDEX_FILE, SAFETENSORS_DTYPES
from .errors import BadInputError

_HASH_CHUNK_BYTES = 64 * 1024 * 1024


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

    Files appear under their final names only when complete. `position()` is a resume point: the
    bytes of the shard in progress are fsynced and its length and sha256 so far recorded;
    `resume(position)` truncates the partial shard back to it and goes on from there, so a writer
    resumed after a crash produces the same bytes as one that never stopped.
    """

    def __init__(self, out_dir: Path, tensors: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(tensors, max_shard_bytes)
        self._order = [(shard, name) for shard in self.shards for name in shard.entries]
        self._next = 0
        self._file = None  # open temp file of the shard being written
        self._temp_path: Path | None = None
        self._hash = None  # sha256 of the bytes written to the open shard so far
        self.sealed: dict[str, dict] = {}  # file -> {"bytes", "sha256"} of every complete shard

    @property
    def files(self) -> list[str]:
        return [shard.file for shard in self.shards]

    @property
    def total_bytes(self) -> int:
        """Size on disk of the whole planned checkpoint (headers included)."""
        return sum(8 + len(shard.header()) + shard.data_bytes for shard in self.shards)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, expected = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"writer expected tensor {expected!r} next, got {name!r}")
        entry = shard.entries[name]
        if DTYPE_NAMES.get(tensor.dtype) != entry["dtype"] or list(tensor.shape) != entry["shape"]:
            raise RuntimeError(f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, planned {entry}")
        if self._file is None:
            self._temp_path = self._temp(shard)
            self._file = open(self._temp_path, "wb")
            self._hash = hashlib.sha256()
            header = shard.header()
            self._write_bytes(len(header).to_bytes(8, "little"))
            self._write_bytes(header)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._write_bytes(memoryview(data.numpy()))
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] is not shard:
            self._seal(shard)

    def position(self) -> dict:
        """Make everything written so far durable and say where the writer stands (JSON-able)."""
        partial = None
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            partial = {"bytes": self._file.tell(), "sha256": self._hash.hexdigest()}
        return {"next_tensor": self._next, "partial": partial, "sealed": dict(self.sealed)}

    def resume(self, position: dict) -> None:
        """Continue from `position()` of an earlier writer with the same plan."""
        self._next = position["next_tensor"]
        self.sealed = dict(position["sealed"])
        for file, seal in self.sealed.items():
            path = self.out_dir / file
            if not path.is_file() or path.stat().st_size != seal["bytes"]:
                raise BadInputError(
                    f"{path} is missing or has changed since the interrupted run wrote it; the run cannot be "
                    "resumed. Start over with --force."
                )
        partial = position["partial"]
        if partial is None:
            return
        shard = self._order[self._next][0]
        self._temp_path = self._temp(shard)
        if not self._temp_path.exists() and (self.out_dir / shard.file).exists():
            # sealed after the resume point was taken: take it back and rewrite its tail
            os.replace(self.out_dir / shard.file, self._temp_path)
        try:
            self._file = open(self._temp_path, "r+b")
        except FileNotFoundError:
            raise BadInputError(
                f"{self._temp_path} (the shard the interrupted run was writing) is missing; the run cannot "
                "be resumed. Start over with --force."
            ) from None
        self._hash = hashlib.sha256()
        remaining = partial["bytes"]
        while remaining:
            chunk = self._file.read(min(remaining, _HASH_CHUNK_BYTES))
            if not chunk:
                break
            self._hash.update(chunk)
            remaining -= len(chunk)
        if remaining or self._hash.hexdigest() != partial["sha256"]:
            self.abort()
            raise BadInputError(
                f"{self._temp_path} does not hold the bytes the interrupted run recorded; the run cannot be "
                "resumed. Start over with --force."
            )
        self._file.truncate(partial["bytes"])
        self._file.seek(partial["bytes"])

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
        """Close the shard in progress. Its partial file stays: a resumed run truncates it to the
        last resume point and goes on; `--force` removes it."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _temp(self, shard: _Shard) -> Path:
        return self.out_dir / f".{shard.file}.partial"

    def _write_bytes(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)

    def _seal(self, shard: _Shard) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self.sealed[shard.file] = {"bytes": self._file.tell(), "sha256": self._hash.hexdigest()}
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


def copy_atomic(source: Path, path: Path) -> None:
    """write_atomic of a file's bytes, streamed (a C4 shard is hundreds of MB)."""
    temp = path.with_name(f".{path.name}.partial")
    with open(source, "rb") as read, open(temp, "wb") as f:
        shutil.copyfileobj(read, f, 1 << 20)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
