"""The whole-model SparseGPT procedure as the Wanda repository publishes it (locuslab/wanda,
lib/sparsegpt.py `SparseGPT` and lib/prune.py `prune_sparsegpt`), re-implemented on transformers'
full in-memory model: the reference streamprune's streamed SparseGPT must match.

As published: one Hessian per Linear (q, k and v each keep their own, identical, copy), one sample
per forward, statistics from the dense layer, every Linear of the layer pruned, then the next
inputs from the pruned layer. Only the transformers 5 calling convention differs.
"""

from __future__ import annotations

import math

import torch
from reference_wanda import capture_layer0_inputs, decoder


class SparseGPTReference:
    """lib/sparsegpt.py's class, for one nn.Linear."""

    def __init__(self, layer: torch.nn.Linear):
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        self.H = torch.zeros((self.columns, self.columns))
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01):
        W = self.layer.weight.data.clone().float()
        H = self.H
        del self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H
        mask = None
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prune_n == 0:
                if mask is not None:
                    mask1 = mask[:, i1:i2]
                else:
                    tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                    thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                    mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prune_n != 0 and i % prune_m == 0:
                    tmp = W1[:, i : (i + prune_m)] ** 2 / (torch.diag(Hinv1)[i : (i + prune_m)].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)


# IST-DASLab/sparsegpt's llama.py with --true-sequential: each group pruned from inputs that have
# passed through the groups before it, already pruned
SEQUENTIAL = [
    ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
    ["self_attn.o_proj"],
    ["mlp.up_proj", "mlp.gate_proj"],
    ["mlp.down_proj"],
]


@torch.no_grad()
def sparsegpt_reference(model, input_ids: torch.Tensor, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0,
                        blocksize: int = 128, percdamp: float = 0.01, true_sequential: bool = False):  # fmt: skip
    """Prune `model` in place; prune_n of every prune_m are pruned (2:4: prune_n=2, prune_m=4)."""
    inps, kwargs_of = capture_layer0_inputs(model, input_ids)
    outs = torch.zeros_like(inps)
    for layer, kwargs in zip(decoder(model).layers, kwargs_of):
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        for names in SEQUENTIAL if true_sequential else [list(linears)]:
            subset = {name: linears[name] for name in names}
            gpts = {name: SparseGPTReference(module) for name, module in subset.items()}

            def add_batch(name, gpts=gpts):
                return lambda _m, inp, _out: gpts[name].add_batch(inp[0].data)

            handles = [module.register_forward_hook(add_batch(name)) for name, module in subset.items()]
            for j in range(inps.shape[0]):
                outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
            for h in handles:
                h.remove()
            for name in gpts:
                gpts[name].fasterprune(sparsity, prune_n=prune_n, prune_m=prune_m, percdamp=percdamp,
                                       blocksize=blocksize)  # fmt: skip
        for j in range(inps.shape[0]):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        inps, outs = outs, inps
    return model
