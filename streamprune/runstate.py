"""The run states that make a pruning run and a depth scoring resumable: `OUT/.streamprune/`.

For `run`, `state.json` says what the run is (the settings that shape its result and a fingerprint of the
source), how far it got (the first layer not yet done, the writer's resume point, the per-layer
records) and which saved activations file holds the inputs of that layer. It is replaced atomically
only after everything it names is durable on disk, so whatever instant a run dies at, the state on
disk describes a consistent point to go on from. The directory is removed when the run completes.
For `depth`, `depth.json` (ScoringState) does the same for the scoring: the phase and block it got
to, the partial scores, and the tensor files the rest of the scoring needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from . import buffers
from .calibration import file_sha256
from .checkpoint import DTYPE_NAMES, SAFETENSORS_DTYPES, Checkpoint
from .errors import BadInputError, ResourceError, UsageError
from .sizes import format_size
from .writer import write_atomic

STATE_DIR = ".streamprune"
STATE_FILE = "state.json"
DEPTH_STATE_FILE = "depth.json"
OFFLOAD_DIR = "offload"  # --offload disk's buffer file, by default (kept apart from the checkpoints)
STATE_VERSION = 1
_SAMPLE_BYTES = 1024 * 1024

# structure key -> how the user spells it, for messages about a mismatched resume
FLAGS = {
    "source": "MODEL",
    "method": "--method",
    "sparsity": "--sparsity",
    "pattern": "--pattern",
    "propagate": "--propagate",
    "calibration": "--calib",
    "nsamples": "--nsamples",
    "seqlen": "--seqlen",
    "seed": "--seed",
    "dtype": "--dtype",
    "batch_size": "--batch-size",
    "expert_weights": "--expert-weights",
    "max_shard_bytes": "--max-shard-size",
    "criterion": "--criterion",
    "remove": "--remove",
    "keep_first": "--keep-first",
    "keep_last": "--keep-last",
    "iterative": "--iterative",
    "ratio": "--ratio",
    "attention_share": "--attention-share",
    "command": "the command",
}


def source_fingerprint(checkpoint: Checkpoint) -> dict:
    """Identify the source cheaply: config and index bytes, and per weight file its size,
    modification time, inode and a sha256 of its header and of its first and last MiB of tensor
    data (hashing a 140 GB model whole would take longer than some runs; a run hashes each tensor
    as it reads it instead, see Checkpoint.digests)."""
    directory = checkpoint.directory
    fingerprint = {"config.json": file_sha256(directory / "config.json")}
    for path in checkpoint.weight_files:
        stat = path.stat()
        size = stat.st_size
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            header_bytes = 8 + int.from_bytes(f.read(8), "little")
            f.seek(0)
            digest.update(f.read(min(size, header_bytes + _SAMPLE_BYTES)))
            f.seek(max(header_bytes, size - _SAMPLE_BYTES))
            digest.update(f.read())
        # a file rewritten in place has a new modification time; one replaced by a copy, a new inode
        fingerprint[path.name] = (
            f"{size} bytes, modified {stat.st_mtime_ns}, inode {stat.st_dev}:{stat.st_ino}, "
            f"sampled sha256 {digest.hexdigest()}"
        )
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        fingerprint[index.name] = file_sha256(index)
    return fingerprint


class RunState:
    """The state directory of one run. `save()` after each checkpoint; `remove()` when complete."""

    def __init__(self, out: Path, structure: dict):
        self.dir = Path(out) / STATE_DIR
        self.structure = structure  # everything that shapes the result; fixed for the run's life
        self.next_layer = 0  # layers [0, next_layer) are written (up to the writer's position)
        self.writer = None  # CheckpointWriter.position() at next_layer, None before the first save
        self.activations = None  # {"file", "layer", "dtype", "shape"}: inputs of next_layer
        self.dense_activations = None  # --reconstruct: the dense stream's inputs of next_layer, likewise
        # --allocation owl: {"outlier_ratios": [...]} of the layers measured so far (then
        # `activations` holds the dense stream's, with "phase": "owl"), and "sparsities" once done
        self.allocation = None
        self.tensor_digests: dict[str, str] = {}  # every source tensor read so far (Checkpoint.digests)
        self.layers: list[dict] = []  # per-layer records of the finished layers
        self.seconds = 0.0  # time spent by earlier sessions of this run
        self.sessions: list[dict] = []  # one entry per start or resume

    @staticmethod
    def exists(out: Path) -> bool:
        return (Path(out) / STATE_DIR / STATE_FILE).is_file()

    @classmethod
    def load(cls, out: Path) -> RunState:
        path = Path(out) / STATE_DIR / STATE_FILE
        try:
            data = json.loads(path.read_text())
            if data["version"] != STATE_VERSION:
                raise ValueError(f"state version {data['version']}, this streamprune writes {STATE_VERSION}")
            state = cls(out, data["structure"])
            for key in ("next_layer", "writer", "activations", "layers", "seconds", "sessions"):
                setattr(state, key, data[key])
            state.allocation = data.get("allocation")
            state.dense_activations = data.get("dense_activations")
            state.tensor_digests = data.get("tensor_digests", {})
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise BadInputError(
                f"{path} (the state of an interrupted run) cannot be read ({err}); start over with --force"
            ) from err
        return state

    def check_same_run(self, structure: dict, out: Path) -> None:
        check_same_structure(self.structure, structure, out, "an unfinished run")

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {
            "version": STATE_VERSION,
            "structure": self.structure,
            "next_layer": self.next_layer,
            "writer": self.writer,
            "activations": self.activations,
            "dense_activations": self.dense_activations,
            "allocation": self.allocation,
            "tensor_digests": self.tensor_digests.copy(),  # the reader thread may be adding to it
            "layers": self.layers,
            "seconds": self.seconds,
            "sessions": self.sessions,
        }
        write_atomic(self.dir / STATE_FILE, (json.dumps(data, indent=1) + "\n").encode())

    def save_activations(self, hidden: torch.Tensor, layer: int, phase: str = "prune",
                         rows: Iterable[torch.Tensor] | None = None, shape: list[int] | None = None) -> dict:  # fmt: skip
        """Write `hidden` (the inputs of `layer` in `phase`) to a new file, durable before it gets its
        name; returns the description to put in the state. The older file stays until `drop_stale`.
        `rows` and `shape`: the whole buffer's rows when `hidden` is this process's share of it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"activations-{phase}-layer{layer:05d}.bin"
        return {**write_tensor_file(path, hidden, rows, shape), "layer": layer, "phase": phase}

    def load_activations(self, out: torch.Tensor | None = None, dense: bool = False) -> torch.Tensor:
        """The saved activations (the dense stream's with `dense`), into `out` (a buffer of their
        shape and dtype) when given."""
        return read_tensor_file(self.dir, self.dense_activations if dense else self.activations, out)

    def drop_stale(self) -> None:
        """Delete activation files and temporaries the state does not name (older checkpoints,
        or a newer one whose state update never happened)."""
        if not self.dir.is_dir():
            return
        keep = [saved["file"] for saved in (self.activations, self.dense_activations) if saved]
        for path in self.dir.iterdir():
            if path.name not in (STATE_FILE, OFFLOAD_DIR, *keep):
                path.unlink()

    def remove(self) -> None:
        """Called once the run is complete; state.json goes last, so that a run killed halfway
        through still finds it, resumes with nothing left to do, and finishes again."""
        offload = self.dir / OFFLOAD_DIR
        if offload.is_symlink():
            offload.unlink()
        elif offload.is_dir():
            shutil.rmtree(offload)
        for path in self.dir.iterdir():
            if path.name != STATE_FILE:
                path.unlink()
        shutil.rmtree(self.dir)


def saved_state(out: Path, name: str = STATE_FILE) -> bytes | None:
    """A state file as it is on disk now (None: there is none), to notice another writer."""
    try:
        return (Path(out) / STATE_DIR / name).read_bytes()
    except FileNotFoundError:
        return None


class ScoringState:
    """The state directory of a depth scoring. Each `save` writes the tensors that changed to new
    files, then replaces depth.json (naming every live tensor's file) atomically, then deletes the
    files it no longer names: a kill at any instant leaves one consistent save to go on from."""

    def __init__(self, out: Path, structure: dict):
        self.dir = Path(out) / STATE_DIR
        self.structure = structure
        self.progress: dict | None = None  # what the scoring recorded at its last save
        self.files: dict[str, dict] = {}  # tensor name -> write_tensor_file's description
        self.saves = 0  # numbers the files, so a save never overwrites a file the last one names

    @classmethod
    def load(cls, out: Path) -> ScoringState | None:
        """The state of an unfinished depth scoring in `out`, or None when there is none."""
        path = Path(out) / STATE_DIR / DEPTH_STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data["version"] != STATE_VERSION:
                raise ValueError(f"state version {data['version']}, this streamprune writes {STATE_VERSION}")
            state = cls(out, data["structure"])
            state.progress, state.files, state.saves = data["progress"], data["files"], data["saves"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise BadInputError(
                f"{path} (the state of an interrupted depth scoring) cannot be read ({err}); start over with --force"
            ) from err
        return state

    def tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return read_tensor_file(self.dir, self.files[name], out)

    def save(self, progress: dict, tensors: dict[str, torch.Tensor], unchanged: Iterable[str] = ()) -> None:
        """`tensors` are every tensor the rest of the scoring needs; those named in `unchanged` are
        not written again when an earlier save already holds them."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.saves += 1
        unchanged = set(unchanged)
        files = {}
        for name, tensor in tensors.items():
            if name in unchanged and name in self.files:
                files[name] = self.files[name]
            else:
                files[name] = write_tensor_file(self.dir / f"{name}.save{self.saves:06d}.bin", tensor)
        data = {"version": STATE_VERSION, "structure": self.structure, "progress": progress, "files": files,
                "saves": self.saves}  # fmt: skip
        write_atomic(self.dir / DEPTH_STATE_FILE, (json.dumps(data) + "\n").encode())
        self.progress, self.files = progress, files
        named = {info["file"] for info in files.values()}
        for path in self.dir.iterdir():
            if path.is_file() and path.name not in named and path.name != DEPTH_STATE_FILE:
                path.unlink()


def check_same_structure(old: dict, new: dict, out: Path, holds: str) -> None:
    """Refuse to go on from what `out` holds (`holds`, made with settings `old`) when settings that
    change the result differ; the message names each flag with both values."""
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if not changed:
        return
    lines = []
    for key in changed:
        was, asked = old.get(key), new.get(key)
        if isinstance(was, dict) and isinstance(asked, dict):  # show only the entries that differ
            differ = [k for k in sorted(set(was) | set(asked)) if was.get(k) != asked.get(k)]
            was, asked = {k: was.get(k) for k in differ}, {k: asked.get(k) for k in differ}
        flag = FLAGS.get(key, key)
        lines.append(f"  {flag}: the run in {out} used {_show(was)}, this command asks for {_show(asked)}")
    raise UsageError(
        f"{out} holds {holds} with different settings, so it cannot be resumed:\n"
        + "\n".join(lines)
        + "\nRun the original command to resume it, choose a new --out, or add --force to discard it and "
        "start over."
    )


def write_tensor_file(path: Path, tensor: torch.Tensor, rows: Iterable[torch.Tensor] | None = None,
                      shape: list[int] | None = None) -> dict:  # fmt: skip
    """Write `tensor`'s bytes to `path`, durable before it gets that name; returns what a state file
    records to read it back. Row by row, releasing each: an offloaded buffer stays unmapped. `rows`
    and `shape`: a tensor whose rows are not all here (one process's share of several), in order."""
    temp = path.with_name(f".{path.name}.partial")
    if rows is None:
        rows, shape = buffers.released_rows(tensor), list(tensor.shape)
    with open(temp, "wb") as f:
        for row in rows:
            f.write(memoryview(row.contiguous().view(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    return {"file": path.name, "dtype": DTYPE_NAMES[tensor.dtype], "shape": shape}


def read_tensor_file(directory: Path, info: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor `write_tensor_file` described as `info`, into `out` (of its shape and dtype) when given."""
    tensor = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]]) if out is None else out
    if list(tensor.shape) != info["shape"] or DTYPE_NAMES[tensor.dtype] != info["dtype"]:
        raise BadInputError(f"the saved tensor file {directory / info['file']} does not fit this run; start over with --force")
    for row, _ in enumerate(read_rows(directory, info, rows=tensor)):
        buffers.release(tensor, slice(row, row + 1))
    return tensor


def read_rows(directory: Path, info: dict, rows: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """The rows of the tensor file `info` describes, in order: read into `rows[i]` when given, else
    each into one reused row tensor (valid until the next is read)."""
    path = directory / info["file"]
    shape, dtype = info["shape"], SAFETENSORS_DTYPES[info["dtype"]]
    scratch = torch.empty(shape[1:], dtype=dtype) if rows is None else None
    got, expected = 0, math.prod(shape) * dtype.itemsize
    try:
        with open(path, "rb") as f:
            for row in range(shape[0]):
                into = scratch if rows is None else rows[row]
                read = f.readinto(memoryview(into.view(-1).view(torch.uint8).numpy()))
                got += read
                if read < into.numel() * dtype.itemsize:
                    break
                yield into
            extra = f.read(1)
    except OSError as err:
        raise BadInputError(f"cannot read the saved tensor file {path}: {err}; start over with --force") from err
    if got != expected or extra:
        raise BadInputError(f"the saved tensor file {path} has the wrong size; start over with --force")


def check_free_space(out: Path, needed: dict[str, int]) -> None:
    """Refuse early, with the numbers, when the disk holding `out` cannot take `needed` more bytes."""
    where = Path(out).resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    total = sum(needed.values())
    if total > free:
        parts = ", ".join(f"{what} {format_size(n)}" for what, n in needed.items() if n)
        raise ResourceError(
            f"not enough disk space: this run needs {format_size(total)} more in {where} ({parts}), "
            f"but only {format_size(free)} is free there. Free some space or choose an --out on a larger disk."
        )


def _show(value) -> str:
    return "nothing" if value is None else json.dumps(value)
