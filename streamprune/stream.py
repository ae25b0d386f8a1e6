"""The layer stream that run, eval and depth share: open a source (every check before any heavy
work), embed tokens into an activation buffer, read decoder layers in order with the next one
prefetched on a background thread, and push a buffer through one layer in micro-batches with
observers the caller supplies (a pruning method's statistics, a depth criterion's sums). No method
code lives here: a layer in, its outputs and whatever the observers saw out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import buffers
from .background import Worker
from .checkpoint import FLOAT_DTYPES as DTYPES
from .checkpoint import Checkpoint
from .errors import BadInputError
from .families import TEXT_ONLY, Family, LayerRunner, TensorNames, family_of, tensor_names
from .source import resolve_model

_FINITE_CHECK_ELEMENTS = 1 << 20  # isfinite makes float temporaries of a slice: keep them ~4 MB
_HEAD_CHUNK_BYTES = 256 * 1024 * 1024  # logits of one chunk of tokens, float32

# site -> observer(x): sees each micro-batch's input [batch, seqlen, in] of that input site
SiteObservers = dict[str, Callable[[torch.Tensor], None]]


@dataclass
class Source:
    """A checked source checkpoint, ready to stream: its tensors grouped by layer, the compute dtype,
    and the runner that builds and runs one decoder layer at a time."""

    directory: Path
    checkpoint: Checkpoint
    family: Family
    runner: LayerRunner
    layer_names: dict  # {None: names outside the layers, i: {checkpoint name: name inside layer i}}
    dtype: torch.dtype  # compute dtype
    names: TensorNames = TEXT_ONLY  # where the language model's tensors are

    @property
    def num_layers(self) -> int:
        return self.runner.config.num_hidden_layers

    def capped_seqlen(self, seqlen: int) -> int:
        """`seqlen`, at most the model's max_position_embeddings."""
        return min(seqlen, getattr(self.runner.config, "max_position_embeddings", None) or seqlen)

    @property
    def embedding_scale(self) -> float | None:
        """What the family multiplies embeddings by (Gemma: sqrt(hidden_size)), or None."""
        return self.runner.config.hidden_size**0.5 if self.family.scaled_embedding else None

    def embed(self, input_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """embed() with this source's checkpoint, compute dtype and embedding scale."""
        return embed(self.checkpoint, self.names.embedding, input_ids, self.dtype, out=out, scale=self.embedding_scale)

    def check_token_ids(self, ids: torch.Tensor) -> None:
        """Refuse token ids the embedding has no row for: the tokenizer belongs to another model."""
        vocab = self.checkpoint.tensors[self.names.embedding].shape[0]
        if ids.numel() and int(ids.max()) >= vocab:
            raise BadInputError(
                f"the tokenizer in {self.directory} produced token id {int(ids.max())}, but the embedding has "
                f"only {vocab} rows; the tokenizer does not belong to this model"
            )

    def check_layer_finite(self, index: int, stored: dict[str, torch.Tensor], saved: str = "") -> None:
        for name, local in self.layer_names[index].items():
            check_weights_finite(stored[local], name, saved)


def open_source(model: str, device: torch.device, dtype: str) -> Source:
    """Find MODEL (a directory, hub id or alias) and check it: supported family, sane config,
    every layer tensor present with the shape the config implies, float weights."""
    directory = resolve_model(model)
    checkpoint = Checkpoint(directory)
    family = family_of(checkpoint.config)
    names = tensor_names(checkpoint.config, checkpoint.tensors)
    compute = compute_dtype(dtype, checkpoint, family, names)
    runner = LayerRunner(directory, family, device, compute)
    return Source(directory, checkpoint, family, runner, layout(checkpoint, runner, names), compute, names)


def compute_dtype(flag: str, checkpoint: Checkpoint, family: Family, names: TensorNames) -> torch.dtype:
    """--dtype: a name in DTYPES, or auto (the dtype the layer weights are stored in)."""
    if flag != "auto":
        return DTYPES[flag]
    probe = f"{names.layer(0)}{family.projections.names[0]}.weight"
    info = checkpoint.tensors.get(probe)
    if info is None:
        raise BadInputError(f"the checkpoint has no tensor {probe!r}; is it a complete decoder-only model?")
    if info.torch_dtype not in DTYPES.values():
        raise BadInputError(
            f"{probe} is stored as {info.dtype}; streamprune prunes float32, bfloat16 and float16 checkpoints, "
            "not quantized ones"
        )
    return info.torch_dtype


def layout(checkpoint: Checkpoint, runner: LayerRunner, names: TensorNames) -> dict:
    """Group the checkpoint's tensors: {None: names outside the layers, i: {name: local name}}.

    Every parameter a layer needs must be present with the shape the config implies; tensors a
    layer does not use (e.g. old rotary buffers) are copied through with their layer.
    """
    num_layers = runner.config.num_hidden_layers
    expected = {name: tuple(p.shape) for name, p in runner.skeleton(0).state_dict().items()}
    groups: dict = {None: [], **{i: {} for i in range(num_layers)}}
    prefixes = {names.layer(i): i for i in range(num_layers)}
    dots = names.layer(0).count(".")
    for name in sorted(checkpoint.tensors):
        prefix = ".".join(name.split(".")[:dots]) + "."
        if prefix in prefixes:
            groups[prefixes[prefix]][name] = name[len(prefix) :]
        else:
            groups[None].append(name)
    if runner.experts is not None and f"{names.layer(0)}{runner.experts.block}.experts.gate_up_proj" in checkpoint.tensors:
        raise BadInputError(
            "the checkpoint stores each block's experts stacked in one tensor (experts.gate_up_proj, as transformers "
            "holds them in memory); streamprune reads the per-expert layout the hub's checkpoints use "
            "(experts.{e}.gate_proj.weight, ...) so far"
        )
    for index in range(num_layers):
        present = set(groups[index].values())
        for local, shape in expected.items():
            full = names.layer(index) + local
            if local not in present:
                raise BadInputError(
                    f"the checkpoint has no tensor {full!r}; it is incomplete or not a {runner.config.model_type} model"
                )
            got = checkpoint.tensors[full].shape
            if got != shape:
                raise BadInputError(f"tensor {full!r} has shape {list(got)}, but config.json implies {list(shape)}")
            _check_float(checkpoint.tensors[full])
    _check_outside(checkpoint, runner, names)
    return groups


def _check_outside(checkpoint: Checkpoint, runner: LayerRunner, names: TensorNames) -> None:
    """The embedding, final norm and (untied) head: present, float, the embedding [vocab, hidden]."""
    required = [names.embedding, names.norm]
    if not getattr(runner.config, "tie_word_embeddings", False):
        required.append(names.head)
    for name in required:
        if name not in checkpoint.tensors:
            raise BadInputError(f"the checkpoint has no tensor {name!r}; it is incomplete")
        _check_float(checkpoint.tensors[name])
    width = runner.config.hidden_size
    embedding = checkpoint.tensors[names.embedding].shape
    if len(embedding) != 2 or embedding[1] != width:
        raise BadInputError(
            f"tensor {names.embedding!r} has shape {list(embedding)}, but config.json implies [vocab, {width}]"
        )


def _check_float(info) -> None:
    if info.torch_dtype not in DTYPES.values():
        raise BadInputError(
            f"tensor {info.name!r} in {info.file.name} is stored as {info.dtype}; streamprune prunes float32, "
            "bfloat16 and float16 checkpoints, not quantized or integer ones"
        )


class LayerReader:
    """Reads decoder layers in a given order; with `overlap`, the next layer's tensors are read on a
    background thread while the caller computes with the current one (into pinned memory with
    `pin`, for fast copies to a GPU). Without it, one layer is read at a time, after the caller is
    done with the last. Bytes are counted in `checkpoint.bytes_read` when a layer is handed over,
    so a count saved between layers never includes a read still in flight. `read(index)` replaces
    the plain read (it runs on the reading thread; its errors reach the caller with that layer)."""

    def __init__(self, source: Source, overlap: bool = True, pin: bool = False, read=None):
        self.source, self.overlap, self.pin = source, overlap, pin
        self._read = read or self._plain_read
        self._worker = Worker("streamprune-read", overlap)

    def layers(self, order: list[int]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(index, stored tensors) for each index of `order`."""
        if not order:
            return
        checkpoint = self.source.checkpoint
        future = self._worker.submit(self._read, order[0])
        for position, index in enumerate(order):
            stored = future.result()
            checkpoint.bytes_read += sum(t.numel() * t.element_size() for t in stored.values())
            more = position + 1 < len(order)
            if self.overlap and more:
                future = self._worker.submit(self._read, order[position + 1])
            yield index, stored
            del stored  # the caller's copy goes at the end of its loop body: one layer read at a time
            if not self.overlap and more:
                future = self._worker.submit(self._read, order[position + 1])

    def _plain_read(self, index: int) -> dict[str, torch.Tensor]:
        checkpoint = self.source.checkpoint
        return {
            local: checkpoint.read(name, pin=self.pin, count=False)
            for name, local in self.source.layer_names[index].items()
        }

    def close(self) -> None:
        """Wait for a read in flight and stop the thread (its error, if any, is dropped: the caller
        is already failing or never asked for that layer)."""
        self._worker.close()

    def __enter__(self) -> LayerReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def forward_batches(
    runner: LayerRunner,
    layer: torch.nn.Module,
    index: int,
    hidden: torch.Tensor,
    batch_size: int,
    write_back: bool,
    observers: SiteObservers | None = None,
    on_output: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> None:
    """Run every sample of `hidden` [n, seqlen, hidden] (CPU, or an offloaded buffer) through `layer`
    in micro-batches of `batch_size` samples.

    observers: per input site (families.Projections), called with each micro-batch's input there.
    on_output(x, y): each micro-batch's input and output on the device.
    write_back: replace each micro-batch of `hidden` by the layer's output (in place: a sample's
    input is not needed once its output exists).
    """
    handles = []
    for site, observe in (observers or {}).items():
        first_linear = layer.get_submodule(runner.projections.sites[site][0])
        handles.append(first_linear.register_forward_pre_hook(lambda _module, args, observe=observe: observe(sample(args[0]))))
    try:
        for start in range(0, hidden.shape[0], batch_size):
            x = hidden[start : start + batch_size].to(runner.device)
            y = runner.forward(layer, index, x)
            if on_output is not None:
                on_output(x, y)
            if write_back:
                # straight into the (pinned) buffer: a pageable staging copy would dominate a GPU layer's
                # time (RESULTS.md: one llama-2-70b layer on a GPU)
                hidden[start : start + batch_size].copy_(y)
            buffers.release(hidden, slice(start, start + batch_size))
    finally:
        for handle in handles:
            handle.remove()


def sample(x: torch.Tensor) -> torch.Tensor:
    """A Linear's input as observers take it, [samples, seqlen, in]. A MoE block flattens its tokens
    ([tokens, in]: an expert sees those routed to it); a statistic takes them as one sample, which
    weighs every token alike, as a batch of samples does."""
    return x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])


def embed(
    checkpoint: Checkpoint, name: str, input_ids: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The tokens' embeddings, [*input_ids.shape, hidden] on the CPU (into `out` if given), from the
    checkpoint's embedding `name`, times `scale` in `dtype` where the family scales them
    (Source.embedding_scale).

    The embedding matrix (2 GB for Llama-3-70B) is read in slices of rows, and each slice fills
    the tokens that fall in it, a bounded run of tokens at a time: neither the whole matrix nor a
    second buffer-sized temporary is ever in memory.
    """
    info = checkpoint.tensors[name]
    vocab, width = info.shape
    hidden = torch.empty(*input_ids.shape, width, dtype=dtype) if out is None else out
    flat_ids, flat_hidden = input_ids.reshape(-1), hidden.view(-1, width)  # [tokens], [tokens, width]
    rows_per_slice = max(1, buffers.EMBEDDING_SLICE_BYTES // max(1, info.nbytes // vocab))
    tokens_per_copy = max(1, buffers.EMBEDDING_SLICE_BYTES // (width * hidden.element_size()))
    if buffers.is_offloaded(hidden):  # a run's rows lie all over the buffer: touch few pages at a time
        tokens_per_copy = min(tokens_per_copy, buffers.OFFLOADED_TOKENS_PER_COPY)
    for first in range(0, vocab, rows_per_slice):
        positions = ((flat_ids >= first) & (flat_ids < first + rows_per_slice)).nonzero().squeeze(1)
        if positions.numel():
            table = checkpoint.read(name, rows=slice(first, first + rows_per_slice)).to(dtype)
            if scale is not None:  # as the model does: the rows in the compute dtype, times the scale in it
                table = table * torch.tensor(scale, dtype=dtype)
            for run in positions.split(tokens_per_copy):
                flat_hidden[run] = table[flat_ids[run] - first]
                buffers.release(hidden)
    return hidden


# -- the end of the stream: final norm and LM head -----------------------------------------------------


class Head(torch.nn.Module):
    """The end of the model: final norm (the family's own RMSNorm class), lm_head [vocab, hidden]
    (the embedding when tied) and, where the config asks for it, the final logits' soft-capping."""

    def __init__(self, norm: torch.nn.Module, weight: torch.Tensor, softcap: float | None):
        super().__init__()
        self.norm, self.weight, self.softcap = norm, weight, softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(self.norm(hidden), self.weight)
        if self.softcap is not None:  # as Gemma 2's forward: logits / cap, tanh, * cap
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def load_head(source: Source) -> Head:
    """The model's Head on the compute device in the compute dtype."""
    checkpoint, runner = source.checkpoint, source.runner
    names = source.names
    head_name = names.head if names.head in checkpoint.tensors else names.embedding
    norm_weight, head = checkpoint.read(names.norm), checkpoint.read(head_name)
    check_weights_finite(norm_weight, names.norm)
    check_weights_finite(head, head_name)
    norm = runner.norm_class(norm_weight.shape[0], eps=getattr(runner.config, "rms_norm_eps", 1e-6))
    norm.weight = torch.nn.Parameter(norm_weight.to(runner.device, source.dtype), requires_grad=False)
    softcap = getattr(runner.config, "final_logit_softcapping", None)
    return Head(norm.to(runner.device), head.to(runner.device, source.dtype), softcap)


def head_bar(tokens: int, quiet: bool, desc: str = "final norm + LM head") -> tqdm:
    """A progress bar over the `tokens` the head scores, opened before the head is read: after the
    layers' bar is done, a 262k-row head (Gemma 3) over every perplexity token takes minutes, and
    a bar that stops at 100% with nothing after it looks like a hang."""
    return tqdm(desc=desc, total=tokens, unit="token", unit_scale=True, disable=quiet, dynamic_ncols=True)


def token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: Head) -> torch.Tensor:
    """log p(targets[t] | hidden[t]) as float32 on the CPU, for the last layer's outputs hidden
    [T, hidden_size] and targets [T], a chunk of tokens at a time so that the float32 logits
    [chunk, vocab] stay under _HEAD_CHUNK_BYTES."""
    chunk = max(1, _HEAD_CHUNK_BYTES // (head.weight.shape[0] * 4))
    pieces = []
    for first in range(0, len(targets), chunk):
        h = hidden[first : first + chunk].to(head.weight.device)
        logits = head(h).float()  # [chunk, vocab]
        picked = targets[first : first + chunk].to(head.weight.device)
        pieces.append((logits.log_softmax(-1).gather(1, picked.unsqueeze(1)).squeeze(1)).cpu())
    return torch.cat(pieces)


# -- NaN and Inf ----------------------------------------------------------------------------------------


def check_weights_finite(tensor: torch.Tensor, name: str, saved: str = "") -> None:
    """Refuse a source tensor holding NaN or Inf: everything computed from it would be broken.
    `saved` says what the run has kept."""
    nan, inf = nonfinite_counts(tensor)
    if nan or inf:
        raise BadInputError(
            f"the source checkpoint is broken: tensor {name!r} holds {nan:,} NaN and {inf:,} Inf values, so "
            f"anything computed from it would be broken too; stopped before using it. {saved}".strip()
        )


def check_activations_finite(
    hidden: torch.Tensor, index: int, saved: str = "", in_float32: str = "run the same command with --dtype float32"
) -> None:
    """Refuse to go on when a layer's outputs overflowed: later layers, and any statistics taken
    from them, would be computed from NaN. `in_float32` says how to compute in float32 instead."""
    nan = inf = 0
    rows = max(1, _FINITE_CHECK_ELEMENTS // max(1, hidden[0].numel()))
    for start in range(0, hidden.shape[0], rows):  # in slices, so that an offloaded buffer stays unmapped
        counts = nonfinite_counts(hidden[start : start + rows])
        nan, inf = nan + counts[0], inf + counts[1]
        buffers.release(hidden, slice(start, start + rows))
    if nan or inf:
        hint = (
            f"The weights are finite, so the layer overflowed: {in_float32}."
            if hidden.dtype != torch.float32
            else "The weights are finite but overflow even in float32: the checkpoint is broken."
        )
        raise BadInputError(
            f"the outputs of layer {index} hold {nan:,} NaN and {inf:,} Inf values (in "
            f"{str(hidden.dtype).removeprefix('torch.')}); stopped before layer {index + 1}. {hint} {saved}".strip()
        )


def nonfinite_counts(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a floating-point tensor; (0, 0) for any other dtype. Looked at in
    slices, so that the boolean temporaries stay small for a buffer of many GB."""
    if not tensor.is_floating_point():
        return 0, 0
    nan = inf = 0
    for part in tensor.reshape(-1).split(_FINITE_CHECK_ELEMENTS):
        if not bool(torch.isfinite(part).all()):
            nan, inf = nan + int(torch.isnan(part).sum()), inf + int(torch.isinf(part).sum())
    return nan, inf
