"""The narrower model's shapes: the attention and MLP geometry, how many key-value groups and MLP
channels every layer loses for a --ratio, the narrowed config.json, and a layer's tensors cut to
the kept heads and channels. Counting is done on meta-device layers built from the configs, so
every family's own parameters (biases, per-head norms) are counted as transformers builds them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig

from ..errors import UsageError
from ..families import Family, text_config

# the config fields that give an output Linear (o_proj, down_proj) a bias where the family has them
BIAS_FIELDS = {"attention": ("attention_bias", "self_attn.o_proj.bias"), "mlp": ("mlp_bias", "mlp.down_proj.bias")}


@dataclass(frozen=True)
class Geometry:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, fields: dict) -> Geometry:
        """From a language model's config fields (families.text_config's)."""
        heads = fields["num_attention_heads"]
        return cls(fields["hidden_size"], heads, fields.get("num_key_value_heads") or heads,
                   fields.get("head_dim") or fields["hidden_size"] // heads, fields["intermediate_size"])  # fmt: skip

    @property
    def group_heads(self) -> int:
        """Query heads per key-value group."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class Cut:
    """What every layer loses: whole key-value groups (with their query heads) and MLP channels."""

    groups: int
    channels: int


def narrowed_fields(fields: dict, geometry: Geometry, cut: Cut, biases: dict[str, bool]) -> dict:
    """The language model's config fields after `cut`; head_dim is written explicitly (hidden_size /
    heads no longer gives it); `biases`: site -> whether its output Linear gets a bias."""
    kv_heads = geometry.kv_heads - cut.groups
    new = {**fields, "num_attention_heads": kv_heads * geometry.group_heads, "num_key_value_heads": kv_heads,
           "head_dim": geometry.head_dim, "intermediate_size": geometry.intermediate - cut.channels}  # fmt: skip
    for site, wanted in biases.items():
        if wanted:
            new[BIAS_FIELDS[site][0]] = True
    return new


def narrowed_config(config: dict, geometry: Geometry, cut: Cut, biases: dict[str, bool]) -> dict:
    """config.json after `cut`, changing only what must change (a vision-language checkpoint's
    text_config)."""
    if isinstance(config.get("text_config"), dict):
        return {**config, "text_config": narrowed_fields(config["text_config"], geometry, cut, biases)}
    return narrowed_fields(config, geometry, cut, biases)


def skeleton(family: Family, fields: dict) -> torch.nn.Module:
    """One decoder layer of a model with these config fields, on the meta device."""
    config = AutoConfig.for_model(family.model_type, **{k: v for k, v in fields.items() if k != "model_type"})
    layer_class = family.classes()[0]
    with torch.device("meta"):
        return layer_class(config, 0)


def shapes(layer: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in layer.state_dict().items()}


def parameter_count(family: Family, fields: dict) -> int:
    return sum(torch.Size(shape).numel() for shape in shapes(skeleton(family, fields)).values())


def compensable(family: Family, fields: dict) -> dict[str, bool]:
    """Per site (attention, mlp): whether the family's config can give its output Linear a bias."""
    result = {}
    for site, (field, bias) in BIAS_FIELDS.items():
        result[site] = bias in shapes(skeleton(family, {**fields, field: True}))
    return result


def choose_cut(family: Family, config: dict, ratio: float, attention_share: float | None,
               biases: dict[str, bool]) -> tuple[Cut, float]:  # fmt: skip
    """How many key-value groups and MLP channels every layer loses so that the block parameters
    (biases added for compensation included) shrink by `ratio`; and the attention share used.
    Attention gets the nearest whole number of groups to its share of the removal (at most what the
    whole ratio allows); the MLP makes up the rest, so the total stays on target however coarse the
    groups are."""
    fields = text_config(config)
    geometry = Geometry.of(fields)
    whole = parameter_count(family, fields)
    per_group = whole - parameter_count(family, narrowed_fields(fields, geometry, Cut(1, 0), {}))
    per_channel = whole - parameter_count(family, narrowed_fields(fields, geometry, Cut(0, 1), {}))
    if attention_share is None:  # FLAP's UL-UM: the same fraction of heads and of channels
        attention = per_group * geometry.kv_heads
        attention_share = attention / (attention + per_channel * geometry.intermediate)
    # never more groups than the whole --ratio allows: the MLP cannot give parameters back
    most = min(geometry.kv_heads - 1, int(ratio * whole // per_group))
    groups = min(most, round(attention_share * ratio * whole / per_group))
    target = (1 - ratio) * whole
    before = parameter_count(family, narrowed_fields(fields, geometry, Cut(groups, 0), biases))
    channels = max(0, round((before - target) / per_channel))  # below 0: compensation biases outweigh a tiny ratio
    if channels >= geometry.intermediate:
        raise UsageError(
            f"--ratio {ratio} with --attention-share {attention_share:.3f} would remove {channels} of the "
            f"{geometry.intermediate} MLP channels of every layer; lower --ratio or raise --attention-share"
        )
    return Cut(groups, channels), attention_share


def narrowed_tensors(stored: dict[str, torch.Tensor], geometry: Geometry, q_channels: torch.Tensor,
                     kv_channels: torch.Tensor, mlp_channels: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
    """A layer's tensors (local names) cut to the kept query channels (heads x head_dim), key-value
    channels and MLP channels; everything else as read. Fused Linears (Phi-3's qkv_proj and
    gate_up_proj) are cut part by part."""
    g = geometry
    q_width, kv_width = g.heads * g.head_dim, g.kv_heads * g.head_dim
    rows = {
        "self_attn.q_proj": q_channels,
        "self_attn.k_proj": kv_channels,
        "self_attn.v_proj": kv_channels,
        "self_attn.qkv_proj": torch.cat([q_channels, q_width + kv_channels, q_width + kv_width + kv_channels]),
        "mlp.gate_proj": mlp_channels,
        "mlp.up_proj": mlp_channels,
        "mlp.gate_up_proj": torch.cat([mlp_channels, g.intermediate + mlp_channels]),
    }
    columns = {"self_attn.o_proj.weight": q_channels, "mlp.down_proj.weight": mlp_channels}
    # per-head norms (Qwen3, Gemma: [head_dim]) stay; norms over all heads (OLMo 2: [heads x head_dim]) are cut,
    # and then normalise the kept heads over fewer channels: removing heads changes the kept ones there
    norms = {("self_attn.q_norm.weight", q_width): q_channels, ("self_attn.k_norm.weight", kv_width): kv_channels}
    out = {}
    for local, tensor in stored.items():
        module = local.rsplit(".", 1)[0]
        if module in rows:
            out[local] = tensor[rows[module]]
        elif local in columns:
            out[local] = tensor[:, columns[local]]
        elif (local, tensor.shape[0]) in norms:
            out[local] = tensor[norms[local, tensor.shape[0]]]
        else:
            out[local] = tensor
    return out
