"""A model's geometry: the sizes that decide a run's memory and work, read from config.json alone
(a vision-language checkpoint's vision tower counted as the parameters it copies)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig

from ..families import FAMILIES, num_experts, text_config


@dataclass(frozen=True)
class Geometry:
    """The sizes that decide memory and work, from a Llama-family config.json."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    fused: bool = False  # Phi-3: q/k/v one Linear, gate/up another (a larger largest Linear)
    copied_params: int = 0  # a vision-language checkpoint's vision tower and projector, copied as they are
    # mixture of experts: `experts` MLPs of width `intermediate` a block, `experts_per_token` of them
    # run for each token, beside a shared MLP of width `shared_intermediate` (Qwen2-MoE) run for all
    experts: int = 0
    experts_per_token: int = 0
    shared_intermediate: int = 0
    # the weights of a block's norms: two RMSNorms in Llama, four in Gemma 2, and q/k norms beside
    # them in Qwen 3, OLMo 2 and Gemma 3 (kept, not pruned, but read, held and written)
    norm_params: int = 0

    @classmethod
    def from_config(cls, config: dict) -> Geometry:
        copied = 0
        if "text_config" in config:  # a vision-language checkpoint: its language model's (the rest is copied)
            copied = vision_params(config)
            config = text_config(config)
        heads = config["num_attention_heads"]
        moe = getattr(FAMILIES.get(config.get("model_type")), "experts", None)
        experts = num_experts(config) if moe else 0
        return cls(
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            intermediate=config[moe.width] if moe else config["intermediate_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=config.get("model_type") in ("qwen2", "qwen2_moe") or bool(config.get("attention_bias", False)),
            fused=config.get("model_type") == "phi3",
            copied_params=copied,
            experts=experts,
            experts_per_token=config.get("num_experts_per_tok") or 0 if experts else 0,
            shared_intermediate=config.get("shared_expert_intermediate_size") or 0 if experts else 0,
            norm_params=layer_norm_params(config),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of the pruned Linears (seven, Phi-3's four, or a MoE block's attention, shared
        MLP and every expert's three)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        if self.fused:
            return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i)}
        attention = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q)}
        if not self.experts:
            return {**attention, "gate": (i, h), "up": (i, h), "down": (h, i)}
        shared = self.shared_intermediate
        mlps = {**({"shared gate": (shared, h), "shared up": (shared, h), "shared down": (h, shared)} if shared else {})}
        for e in range(self.experts):
            mlps.update({f"expert {e} gate": (i, h), f"expert {e} up": (i, h), f"expert {e} down": (h, i)})
        return {**attention, **mlps}

    def site_widths(self) -> dict[str, int]:
        """in_features of each input site (families.Projections)."""
        q = self.heads * self.head_dim
        widths = {"attention input": self.hidden, "o_proj input": q}
        if not self.experts or self.shared_intermediate:
            widths.update({"mlp input": self.hidden, "down_proj input": self.shared_intermediate or self.intermediate})
        for e in range(self.experts):
            widths.update({f"expert {e} input": self.hidden, f"expert {e} down_proj input": self.intermediate})
        return widths

    @property
    def linear_params(self) -> int:
        return sum(rows * cols for rows, cols in self.linear_shapes().values())

    @property
    def active_linear_params(self) -> int:
        """The pruned Linears' weights one token computes with: all of them, or in a MoE block those
        of its experts_per_token experts (the forward's work)."""
        if not self.experts:
            return self.linear_params
        idle = (self.experts - self.experts_per_token) * 3 * self.hidden * self.intermediate
        return self.linear_params - idle

    @property
    def layer_params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        routers = self.experts * self.hidden + (self.hidden if self.shared_intermediate else 0)  # + the shared gate
        return self.linear_params + bias + routers + self.norm_params

    @property
    def outside_params(self) -> int:
        """Embedding, final norm, (untied) lm_head, and what a vision-language checkpoint copies."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden + self.copied_params


def layer_norm_params(config: dict) -> int:
    """The parameters of one decoder block's norms, counted on transformers' own layer built on the
    meta device from config.json (no memory): each family has the norms it has. Two hidden-sized
    RMSNorms where the family is unknown."""
    family = FAMILIES.get(config.get("model_type"))
    if family is None:
        return 2 * config["hidden_size"]
    fields = {key: value for key, value in config.items() if key != "model_type"}
    layer_class = family.classes()[0]
    with torch.device("meta"):
        layer = layer_class(AutoConfig.for_model(config["model_type"], **fields), 0)
    norms = [module for module in layer.modules() if "Norm" in type(module).__name__]
    return sum(parameter.numel() for norm in norms for parameter in norm.parameters(recurse=False))


def vision_params(config: dict) -> int:
    """Parameters of Gemma 3's SigLIP vision tower and projector (the vision tower streamprune
    copies), from config.json's vision_config completed with its class's defaults."""
    fields = {k: v for k, v in config.get("vision_config", {}).items() if k != "model_type"}
    vision = AutoConfig.for_model("siglip_vision_model", **fields)
    h, i, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # q, k, v, o; fc1, fc2; two LayerNorms
    embeddings = vision.num_channels * patch * patch * h + h + (vision.image_size // patch) ** 2 * h
    head = 0
    if getattr(vision, "vision_use_head", True):  # attention pooling: probe, attention, LayerNorm, MLP
        head = h + 3 * (h * h + h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h)
    text_hidden = config["text_config"].get("hidden_size", 2304)  # Gemma3TextConfig's default
    projector = h * text_hidden + h  # mm_input_projection_weight, mm_soft_emb_norm
    return vision.num_hidden_layers * layer + embeddings + 2 * h + head + projector  # + post_layernorm
