"""The activation buffer that carries every calibration (or evaluation) token from layer to layer:
in RAM, or in a memory-mapped file for machines whose RAM cannot hold it.

A file-backed buffer's pages are the kernel's page cache, not the process's memory: `release`
drops a processed slice from the process's resident set (the bytes stay in the file; touching them
again reads them back). Every pass over the buffer (embedding, forwards, checks, activation
checkpoints) releases as it goes, so that about one micro-batch of it is resident at a time.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

_PAGE_BYTES = mmap.PAGESIZE
_MADV_DONTNEED = 4  # linux/mman.h; on a shared file mapping the data stays in the file
# stream.embed reads the embedding in slices of this many bytes and copies runs of tokens of at
# most this size (fewer into an offloaded buffer, whose rows a run touches all over the file)
EMBEDDING_SLICE_BYTES = 64 * 1024 * 1024
OFFLOADED_TOKENS_PER_COPY = 2048
_M_MMAP_THRESHOLD = -3  # glibc malloc.h
_MMAP_THRESHOLD_BYTES = 4 << 20


def return_freed_memory_to_the_system() -> None:
    """Have glibc's malloc serve every allocation of 4 MiB or more by its own mmap, unmapped when
    freed. By default malloc raises that threshold (up to 32 MiB) after such frees and then keeps
    freed weight tensors in its heap: the resident set grew by fragments and stopped following what
    is live. With it fixed, peaks are the live tensors, which the plan predicts; smaller allocations
    (a micro-batch's intermediates on small models) still reuse the heap, which is faster than fresh
    pages each time. No-op where the C library is not glibc."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def available_ram_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def activation_buffer(shape: tuple[int, ...], dtype: torch.dtype, offload_dir: Path | None) -> torch.Tensor:
    """An uninitialised tensor of `shape` in RAM, or (offload_dir given) memory-mapped from a file
    there that has no name: its blocks are freed when the tensor is, or when the process ends."""
    numel = 1
    for size in shape:
        numel *= size
    if offload_dir is None:
        return torch.empty(shape, dtype=dtype)
    directory = Path(offload_dir).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix="streamprune-activations-", suffix=".bin")
    try:
        # every block allocated now: a disk that fills up fails here with ENOSPC, not later with SIGBUS
        os.posix_fallocate(fd, 0, max(1, numel * dtype.itemsize))
        buffer = torch.from_file(name, shared=True, size=numel, dtype=dtype).view(shape)
    finally:
        os.close(fd)
        os.unlink(name)  # the mapping keeps the blocks; the file is gone however the process ends
    return buffer


def is_offloaded(buffer: torch.Tensor) -> bool:
    """Whether `buffer` (or the buffer it is a view of) lives in a mapped file. Asked of the storage,
    which every view shares: a mark on the tensor object would be lost on `hidden.unsqueeze(0)`."""
    return buffer.untyped_storage().filename is not None


def release(buffer: torch.Tensor, rows: slice = slice(0, None)) -> None:
    """Drop rows[start:stop] of a file-backed buffer from this process's memory (no-op in RAM)."""
    if not is_offloaded(buffer):
        return
    rows = slice(rows.start, buffer.shape[0] if rows.stop is None else rows.stop)
    row_bytes = buffer[0].numel() * buffer.element_size()
    start = buffer.data_ptr() + rows.start * row_bytes
    stop = buffer.data_ptr() + min(rows.stop, buffer.shape[0]) * row_bytes
    first_page = start - start % _PAGE_BYTES  # a neighbour's page dropped too is only read back
    length = stop - first_page
    if length > 0:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(first_page), ctypes.c_size_t(length), _MADV_DONTNEED)


def released_rows(buffer: torch.Tensor) -> Iterator[torch.Tensor]:
    """The rows of `buffer` in order, each dropped from memory (if offloaded) once the caller is done with it."""
    for row in range(buffer.shape[0]):
        yield buffer[row]
        release(buffer, slice(row, row + 1))
