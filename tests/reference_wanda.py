"""The published whole-model Wanda procedure (Sun et al. 2023, locuslab/wanda `prune_wanda`),
re-implemented on transformers' full in-memory model, as the reference streamprune must match.

Differences from the original are only those transformers 5 forces: layers take the model-level
`position_embeddings` and return a bare tensor. Everything that decides a mask is as published:
one sample per forward, the running-mean `scaler_row` in float32, per-row stable sort, N:M by
topk over each group of M, statistics from the dense layer, next inputs from the pruned layer.
"""

from __future__ import annotations

import torch
from conftest import attention
from transformers import AutoModelForCausalLM

from streamprune.families import FAMILIES

# the names streamprune prunes in any family (to pick pruned weights out of a checkpoint); the
# reference itself prunes every nn.Linear of a layer (find_layers), and
# test_linears_are_all_the_linears checks that each family's are that set
LINEARS = tuple(dict.fromkeys(linear for family in FAMILIES.values() for linear in family.projections.names))


# transformers' names of a vision-language model's parts in memory -> in its checkpoint files
CHECKPOINT_PREFIXES = {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
                       "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."}  # fmt: skip


def pruned_linear(name: str) -> bool:
    """Whether streamprune prunes the checkpoint tensor `name`: a projection of a decoder block (a
    vision tower's Linears, named alike, are copied as they are)."""
    return name.endswith(tuple(f"{linear}.weight" for linear in LINEARS)) and not name.startswith("vision_tower.")


def checkpoint_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the names its checkpoint files use (a vision-language model's
    differ from those in memory)."""
    if not hasattr(model.model, "language_model"):
        return model.state_dict()
    state = {}
    for name, tensor in model.state_dict().items():
        prefix = next(p for p in CHECKPOINT_PREFIXES if name.startswith(p))
        state[CHECKPOINT_PREFIXES[prefix] + name[len(prefix) :]] = tensor
    return state


def decoder(model):
    """The text decoder of a causal LM (model.model), or of a vision-language one (its language_model)."""
    return getattr(model.model, "language_model", model.model)


def load_full_model(model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention(model_dir)).eval()


def capture_layer0_inputs(model, input_ids: torch.Tensor):
    """Run the model up to decoder layer 0 for each sample; return its inputs [nsamples, seqlen,
    hidden] and, per layer, the keyword arguments the model passes it (each layer's own attention
    mask: sliding-window layers get theirs), taken from a full forward of the first sample."""
    captured = []

    class Stop(Exception):
        pass

    def grab(_module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise Stop

    handle = decoder(model).layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for sample in input_ids:
            try:
                model(sample.unsqueeze(0))
            except Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(captured), layer_kwargs(model, input_ids[:1])


def layer_kwargs(model, input_ids: torch.Tensor) -> list[dict]:
    seen = []

    def grab(_module, _args, kwargs):
        seen.append({k: kwargs[k] for k in ("attention_mask", "position_ids", "position_embeddings")})

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in decoder(model).layers]
    try:
        model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def wanda_metric(weight: torch.Tensor, scaler_row: torch.Tensor) -> torch.Tensor:
    """prune_wanda's W_metric."""
    return weight.abs() * torch.sqrt(scaler_row.reshape(1, -1))


def collect_scaler_rows(layer, inps: torch.Tensor, outs: torch.Tensor, kwargs: dict) -> dict[str, torch.Tensor]:
    """prune_wanda's WrappedGPT.add_batch over one forward of the dense `layer`, one sample at a
    time (outputs into `outs`): each Linear's running-mean scaler_row, float32."""
    subset = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    scaler = {name: torch.zeros(m.in_features) for name, m in subset.items()}
    seen = {name: 0 for name in subset}

    def add_batch(name):
        def hook(_m, inp, _out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).t().float()  # [in, tokens]
            scaler[name] *= seen[name] / (seen[name] + 1)
            seen[name] += 1
            scaler[name] += torch.norm(x, p=2, dim=1) ** 2 / seen[name]

        return hook

    handles = [m.register_forward_hook(add_batch(n)) for n, m in subset.items()]
    for j in range(inps.shape[0]):
        outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
    for h in handles:
        h.remove()
    return scaler


def prune_wanda_mask(scores: torch.Tensor, ratio: float, prune_n: int, prune_m: int) -> torch.Tensor:
    """prune_wanda's mask (True: pruned): prune_n of every prune_m, or the lowest `ratio` of each row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if prune_n:
        for start in range(0, scores.shape[1], prune_m):
            group = scores[:, start : start + prune_m].float()
            mask.scatter_(1, start + torch.topk(group, prune_n, dim=1, largest=False)[1], True)
    else:
        order = torch.sort(scores, dim=-1, stable=True)[1]
        mask.scatter_(1, order[:, : int(scores.shape[1] * ratio)], True)
    return mask


@torch.no_grad()
def wanda_reference(
    model, input_ids: torch.Tensor, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0, metric=wanda_metric,
    layer_sparsities: list[float] | None = None,
):  # fmt: skip
    """Prune `model` in place. prune_n, prune_m as in the original: prune_n of every prune_m are
    *pruned* (for 2:4 and 4:8 that equals keeping N of M). `metric(weight, scaler_row)` replaces
    Wanda's score: methods that share Wanda's procedure and statistic (RIA) differ only there.
    `layer_sparsities` replaces `sparsity` layer by layer (OWL's prune_wanda_outlier)."""
    inps, kwargs_of = capture_layer0_inputs(model, input_ids)
    outs = torch.zeros_like(inps)
    for index, (layer, kwargs) in enumerate(zip(decoder(model).layers, kwargs_of)):
        ratio = sparsity if layer_sparsities is None else layer_sparsities[index]
        scaler = collect_scaler_rows(layer, inps, outs, kwargs)
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            scores = metric(module.weight.data, scaler[name])
            module.weight.data[prune_wanda_mask(scores, ratio, prune_n, prune_m)] = 0
        for j in range(inps.shape[0]):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        inps, outs = outs, inps
    return model


@torch.no_grad()
def layer_outputs(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's output for the whole batch, from one full-model forward."""
    outputs = []
    handles = [
        layer.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach().clone()))
        for layer in decoder(model).layers
    ]
    try:
        model(input_ids)
    finally:
        for h in handles:
            h.remove()
    return outputs
