"""Supported model families, kept as data, and how to run one of their decoder layers on its own.

Every supported family is a Llama-style decoder: `model.embed_tokens`, `model.layers.{i}` with the
same attention and MLP projections (seven Linears, or Phi-3's four with q/k/v and gate/up fused; a
mixture-of-experts block has its router and a gate, up and down Linear per expert), `model.norm`, an
optional `lm_head`. transformers supplies the layer and rotary classes; we only build one layer at a
time on the meta device and give it its own tensors.
"""

from __future__ import annotations

import importlib
import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .errors import BadInputError


@dataclass(frozen=True)
class Projections:
    """The Linears pruned in every block (all of its nn.Linears; embeddings, norms and lm_head are
    kept), grouped by input site: Linears that read the same tensor share one site, so a statistic
    of their input (Wanda's norms, a Hessian) is computed and held once per site, not once per Linear.
    The four sites are the same in every family (plan.geometry.Geometry.site_widths); how many Linears read
    each is not."""

    sites: dict[str, tuple[str, ...]]  # site -> its Linears (local names), in forward order

    @property
    def names(self) -> tuple[str, ...]:
        """Every pruned Linear, in forward order."""
        return tuple(linear for linears in self.sites.values() for linear in linears)

    def site_of(self, linear: str) -> str:
        return next(site for site, linears in self.sites.items() if linear in linears)


SEPARATE = Projections({
    "attention input": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj input": ("self_attn.o_proj",),
    "mlp input": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj input": ("mlp.down_proj",),
})  # fmt: skip
# Phi-3: q, k and v are one Linear's output rows (qkv_proj), gate and up another's (gate_up_proj). A
# fused matrix is pruned as it is stored: per output row, so the same per-row comparison as three
# separate ones (Wanda, RIA, magnitude), and N:M along its inputs as anywhere.
FUSED = Projections({
    "attention input": ("self_attn.qkv_proj",),
    "o_proj input": ("self_attn.o_proj",),
    "mlp input": ("mlp.gate_up_proj",),
    "down_proj input": ("mlp.down_proj",),
})  # fmt: skip
ATTENTION = Projections({site: SEPARATE.sites[site] for site in ("attention input", "o_proj input")})
# Qwen2-MoE: beside the routed experts, one shared expert MLP that sees every token (as an ordinary MLP)
SHARED_EXPERT = Projections({
    **ATTENTION.sites,
    "mlp input": ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
    "down_proj input": ("mlp.shared_expert.down_proj",),
})  # fmt: skip


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts block's routed experts as the hub's checkpoints store them: separate
    Linears {block}.experts.{e}.{gate, up, down}.weight. transformers 5 stacks them into 3D parameters
    (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]); LayerRunner swaps those for one
    Linear per expert and projection (ExpertLinears), so that each expert is observed on the tokens
    the router sends it, pruned as its own matrix and written back under its own name. The router
    (block.gate) stays dense."""

    block: str = "mlp"  # the block's name in the checkpoint (Mixtral's: block_sparse_moe; in memory it is mlp)
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    width: str = "moe_intermediate_size"  # config.json's field for an expert's intermediate size

    def sites(self, num_experts: int) -> dict[str, tuple[str, ...]]:
        """Two input sites per expert: its gate and up read the tokens routed to it, its down their product."""
        sites = {}
        for e in range(num_experts):
            prefix = f"{self.block}.experts.{e}."
            sites[f"expert {e} input"] = (prefix + self.gate, prefix + self.up)
            sites[f"expert {e} down_proj input"] = (prefix + self.down,)
        return sites


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json "model_type"
    architecture: str  # config.json "architectures"[0]
    class_prefix: str  # transformers class names: f"{prefix}DecoderLayer", f"{prefix}RotaryEmbedding"
    # transformers' attention implementation for this family's layers: sdpa, or eager where sdpa
    # cannot compute what the model does (Gemma 2's attention logit soft-capping)
    attention: str = "sdpa"
    scaled_embedding: bool = False  # embeddings times sqrt(hidden_size), in the compute dtype (Gemma)
    # Gemma 3: one rotary embedding per attention kind (local and global rope bases), picked by the
    # layer's entry in config.layer_types
    rotary_by_layer_type: bool = False
    module: str = ""  # transformers' module, when it is not named after model_type (gemma3_text)
    projections: Projections = SEPARATE  # a mixture-of-experts family's: those beside the routed experts
    experts: Experts | None = None  # a mixture-of-experts family's routed experts

    def projections_for(self, config: PretrainedConfig) -> Projections:
        """The Linears pruned in every block of a model with this config (a MoE block's depend on its
        number of experts)."""
        if self.experts is None:
            return self.projections
        return Projections({**self.projections.sites, **self.experts.sites(num_experts(config))})

    def classes(self) -> tuple[type, type, type]:
        """transformers' decoder layer, rotary embedding and RMSNorm classes of the family (the
        final norm's arithmetic differs: OLMo 2 multiplies by the weight before casting back)."""
        name = self.module or self.model_type
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        parts = ("DecoderLayer", "RotaryEmbedding", "RMSNorm")
        return tuple(getattr(module, f"{self.class_prefix}{part}") for part in parts)


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", "Llama"),  # Llama 2/3/3.x, SmolLM2, TinyLlama, ...
        Family("mistral", "MistralForCausalLM", "Mistral"),
        Family("qwen2", "Qwen2ForCausalLM", "Qwen2"),
        Family("qwen3", "Qwen3ForCausalLM", "Qwen3"),  # q/k norms inside attention (kept, not pruned)
        Family("olmo2", "Olmo2ForCausalLM", "Olmo2"),  # norms after attention and MLP, q/k norms
        # norms before and after attention and MLP, sliding and global layers, soft-capped attention
        # and final logits, scaled embeddings, tied head
        Family("gemma2", "Gemma2ForCausalLM", "Gemma2", attention="eager", scaled_embedding=True),
        # Gemma 2's four norms a block, q/k norms, a rope base per attention kind, no soft-capping
        # (so sdpa); the text-only checkpoints (gemma-3-270m, gemma-3-1b)
        Family("gemma3_text", "Gemma3ForCausalLM", "Gemma3", scaled_embedding=True, rotary_by_layer_type=True,
               module="gemma3"),  # fmt: skip
        # fused projections; rope scaling (longrope) and partial rotary (Phi-4-mini) from the config
        Family("phi3", "Phi3ForCausalLM", "Phi3", projections=FUSED),  # Phi-3, Phi-3.5, Phi-4, Phi-4-mini
        # mixture-of-experts: every block's MLP is experts behind a router
        Family("mixtral", "MixtralForCausalLM", "Mixtral", projections=ATTENTION,
               experts=Experts(block="block_sparse_moe", gate="w1", up="w3", down="w2", width="intermediate_size")),  # fmt: skip
        Family("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2Moe", projections=SHARED_EXPERT, experts=Experts()),
        Family("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3Moe", projections=ATTENTION, experts=Experts()),
        Family("olmoe", "OlmoeForCausalLM", "Olmoe", projections=ATTENTION, experts=Experts(width="intermediate_size")),
    )
}
# Vision-language checkpoints whose language model is pruned (architecture -> its family); the
# vision tower and projector are copied as they are
VISION_LANGUAGE = {"Gemma3ForConditionalGeneration": "gemma3_text"}  # gemma-3-4b, -12b, -27b
SUPPORTED = ", ".join(
    [f"{f.architecture} ({f.model_type})" for f in FAMILIES.values()]
    + [f"the language model of {architecture}" for architecture in VISION_LANGUAGE]
)


@dataclass(frozen=True)
class TensorNames:
    """Where the language model's tensors are in a checkpoint: at the top, or under a prefix in a
    vision-language one (as transformers writes Gemma 3's: language_model.model.layers.{i}...)."""

    model: str = "model."  # the decoder: {model}embed_tokens, {model}layers.{i}., {model}norm
    head: str = "lm_head.weight"  # absent when tied to the embedding

    @property
    def embedding(self) -> str:
        return f"{self.model}embed_tokens.weight"

    @property
    def norm(self) -> str:
        return f"{self.model}norm.weight"

    def layer(self, index: int) -> str:
        """The prefix of layer `index`'s tensors."""
        return f"{self.model}layers.{index}."


TEXT_ONLY = TensorNames()
# transformers' two ways of writing a vision-language model's decoder (the first is what it writes)
PREFIXED = (TensorNames("language_model.model.", "language_model.lm_head.weight"), TensorNames("model.language_model."))


def tensor_names(config: dict, names) -> TensorNames:
    """The TensorNames of a checkpoint with this config.json and these tensor names."""
    if (config.get("architectures") or [None])[0] not in VISION_LANGUAGE:
        return TEXT_ONLY
    found = [candidate for candidate in PREFIXED if candidate.embedding in names]
    if not found:
        expected = " or ".join(repr(candidate.embedding) for candidate in PREFIXED)
        raise BadInputError(f"the checkpoint has no tensor {expected}; it is incomplete or not a vision-language model")
    return found[0]


def text_config(config: dict) -> dict:
    """The language model's config.json fields: `config` itself, or a vision-language checkpoint's
    text_config completed with its class's defaults (the hub's lists only what differs from them)."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        return config
    model_type = text.get("model_type")
    if model_type not in FAMILIES:
        raise BadInputError(f"config.json's text_config has model_type {model_type!r}; supported: {SUPPORTED}.")
    check_config_limits(text, partial=True)  # before the config class sizes anything from it
    fields = {k: v for k, v in text.items() if k != "model_type"}
    return {**AutoConfig.for_model(model_type, **fields).to_dict(), "architectures": config.get("architectures")}


def family_of(config: dict) -> Family:
    """The Family of a raw config.json, or a BadInputError that names what is supported."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if architectures and architectures[0] in VISION_LANGUAGE:
        model_type, architectures = VISION_LANGUAGE[architectures[0]], []
        config = text_config(config)
    family = FAMILIES.get(model_type)
    if family is None or (architectures and architectures[0] != family.architecture):
        what = f"model_type {model_type!r}" + (f" ({architectures[0]})" if architectures else "")
        raise BadInputError(f"unsupported architecture: {what}. streamprune supports the Llama family: {SUPPORTED}.")
    if config.get("auto_map"):
        raise BadInputError(
            "this checkpoint asks for custom modeling code (auto_map in config.json); streamprune never runs "
            f"code from a checkpoint. Supported: {SUPPORTED}."
        )
    check_config_limits(config)
    if family.experts is not None and (config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1):
        raise BadInputError(
            "config.json mixes dense and mixture-of-experts blocks (mlp_only_layers or decoder_sparse_step); "
            "streamprune prunes models whose every block is a mixture of experts so far"
        )
    return family


def num_experts(config) -> int:
    """A mixture-of-experts config's number of routed experts (Mixtral's field has another name)."""
    get = config.get if isinstance(config, dict) else lambda field: getattr(config, field, None)
    return get("num_local_experts") or get("num_experts")


# Generous bounds on the config's sizes (Llama-3.1-405B: 126 layers, hidden 16,384, MLP 53,248,
# vocab 128,256), checked before any of them sizes an allocation: a config from the internet is
# untrusted input like the weights.
CONFIG_LIMITS = {
    "num_hidden_layers": 4096,
    "hidden_size": 131_072,
    "intermediate_size": 1_048_576,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 4096,
    "vocab_size": 8_388_608,
    "max_position_embeddings": 134_217_728,
    "num_experts": 4096,
    "num_local_experts": 4096,
    "moe_intermediate_size": 1_048_576,
}
OPTIONAL_FIELDS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "num_experts", "num_local_experts",
                   "moe_intermediate_size")  # fmt: skip


def check_config_limits(config: dict, partial: bool = False) -> None:
    """Every size in config.json a positive integer within CONFIG_LIMITS, and the attention
    geometry consistent; otherwise a BadInputError naming the field and the accepted range.
    `partial`: only the sizes present (a text_config before its class fills in the defaults)."""
    for field, limit in CONFIG_LIMITS.items():
        value = config.get(field)
        if value is None and (field in OPTIONAL_FIELDS or partial):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise BadInputError(
                f"config.json has {field}={value!r}; streamprune accepts an integer from 1 to {limit:,}. "
                "The config is corrupt or not a real model's."
            )
    if partial:
        return
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv_heads:
        raise BadInputError(
            f"config.json has num_attention_heads={heads} and num_key_value_heads={kv_heads}; the first must be "
            "a multiple of the second"
        )
    if config.get("head_dim") is None and config["hidden_size"] % heads:
        raise BadInputError(
            f"config.json has hidden_size={config['hidden_size']}, not a multiple of num_attention_heads={heads}, "
            "and no head_dim"
        )


class LayerRunner:
    """Builds one decoder layer at a time and runs it exactly as the whole model would.

    The whole model computes the rotary embeddings and attention masks once, at model level, and
    hands them to every layer; this class does the same for each micro-batch shape.
    """

    def __init__(self, model_dir, family: Family, device: torch.device, dtype: torch.dtype):
        """model_dir: a checkpoint directory, or a config.json already parsed (a dict: the plan's probe)."""
        # set explicitly: a config built without it means eager attention, and the masks made below
        # must be the ones for the implementation the layers use
        if isinstance(model_dir, dict):
            fields = {k: v for k, v in text_config(model_dir).items() if k != "model_type"}
            self.config: PretrainedConfig = AutoConfig.for_model(family.model_type, **fields)
        else:  # a vision-language checkpoint's: its language model's
            self.config = AutoConfig.from_pretrained(model_dir).get_text_config()
        self.config._attn_implementation = family.attention
        self.device, self.dtype = device, dtype
        # where a mixture-of-experts layer's routed experts are built: the compute device, or the CPU
        # for a layer larger than the GPU (each expert then visits the GPU while it computes)
        self.expert_device = device
        self.layer_class, rotary_class, self.norm_class = family.classes()
        self.rotary = rotary_class(config=self.config).to(device)
        self.rotary_by_layer_type = family.rotary_by_layer_type
        self.experts = family.experts
        self.projections = family.projections_for(self.config)
        self._context: dict[tuple[int, int, str], tuple] = {}

    def skeleton(self, index: int = 0) -> torch.nn.Module:
        """Layer `index` with parameters on the meta device: names and shapes, no memory."""
        with torch.device("meta"):
            layer = self.layer_class(self.config, index)
            if self.experts is not None:
                swap_in_expert_linears(layer, self.experts)
        return layer

    def build(self, index: int, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Layer `index` on the compute device (its routed experts on `expert_device`); `tensors` maps
        local names to weights (any dtype)."""
        layer = self.skeleton(index)
        experts = f"{self.experts.block}.experts." if self.experts is not None else None
        layer.load_state_dict(
            {name: t.to(self.expert_device if experts and name.startswith(experts) else self.device, self.dtype)
             for name, t in tensors.items()},
            strict=True, assign=True,
        )  # fmt: skip
        return layer.eval()

    def attention_kind(self, index: int) -> str:
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return layer_types[index]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    def forward(self, layer: torch.nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [batch, seqlen, hidden_size] on the device -> the layer's output, same shape.
        Autograd records it unless the caller is under torch.no_grad() (depth pruning's Taylor
        score backpropagates through it)."""
        batch, seqlen, _ = hidden.shape
        kind = self.attention_kind(index)
        key = (batch, seqlen, kind, hidden.dtype)  # reconstruction trains in float32 beside a bf16 stream
        if key not in self._context:
            position_ids = torch.arange(seqlen, device=self.device).unsqueeze(0)  # [1, seqlen]
            make_mask = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            # no cache: transformers 5.x renamed the argument (`past_key_values` warns from 5.2x on)
            no_cache = {"cache" if "cache" in inspect.signature(make_mask).parameters else "past_key_values": None}
            mask = make_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=None, position_ids=position_ids, **no_cache
            )
            by_kind = (kind,) if self.rotary_by_layer_type else ()
            with torch.no_grad():
                self._context[key] = (position_ids, mask, self.rotary(hidden, position_ids, *by_kind))
        position_ids, mask, position_embeddings = self._context[key]
        return layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)


def swap_in_expert_linears(layer: torch.nn.Module, names: Experts) -> None:
    """Replace the layer's stacked experts by ExpertLinears, and register its MoE block under the
    checkpoint's name (transformers 5 renamed Mixtral's block_sparse_moe to mlp; its checkpoints
    keep the old name): the layer's state_dict then has the checkpoint's names and the forward,
    which calls self.mlp, runs the same block."""
    block = layer.mlp
    block.experts = ExpertLinears(block.experts, names)
    if names.block != "mlp":
        del layer._modules["mlp"]
        layer._modules[names.block] = block
        object.__setattr__(layer, "mlp", block)  # a plain attribute, outside the module tree


class ExpertLinears(torch.nn.Module):
    """transformers 5's experts module (MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts and
    OlmoeExperts share one forward) with one nn.Linear per expert and projection: the same
    arithmetic, expert by expert, in the same order."""

    def __init__(self, stacked: torch.nn.Module, names: Experts):
        super().__init__()
        experts, double_intermediate, hidden = stacked.gate_up_proj.shape  # [E, 2I, H]
        intermediate = double_intermediate // 2
        self.act_fn, self.names, self.num_experts = stacked.act_fn, names, experts
        for e in range(experts):  # named as the checkpoint's: experts.{e}.{gate, up, down}
            expert = torch.nn.Module()
            expert.add_module(names.gate, torch.nn.Linear(hidden, intermediate, bias=False))
            expert.add_module(names.up, torch.nn.Linear(hidden, intermediate, bias=False))
            expert.add_module(names.down, torch.nn.Linear(intermediate, hidden, bias=False))
            self.add_module(str(e), expert)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:  # fmt: skip
        """hidden_states [tokens, hidden]; top_k_index, top_k_weights [tokens, k]: each token's experts
        and their weights -> [tokens, hidden]. An expert no token chose is not run (nor observed)."""
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            chosen = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(chosen.sum(dim=(-1, -2)), 0).nonzero()  # [experts hit, 1]
        for expert_index in hit[:, 0].tolist():
            if expert_index == self.num_experts:
                continue
            top_k_position, token_index = torch.where(chosen[expert_index])
            expert, x = self.get_submodule(str(expert_index)), hidden_states[token_index]  # x [tokens routed here, hidden]
            with visiting(expert, x.device):
                gate, up = getattr(expert, self.names.gate)(x), getattr(expert, self.names.up)(x)
                y = getattr(expert, self.names.down)(self.act_fn(gate) * up)
            y = y * top_k_weights[token_index, top_k_position, None]
            final.index_add_(0, token_index, y.to(final.dtype))
        return final


@contextmanager
def visiting(module: torch.nn.Module, device: torch.device):
    """`module`'s parameters on `device` for the duration (a no-op where they already are): an
    expert kept on the CPU computes on the GPU, one expert's weights there at a time. The same
    Parameter objects stay in the module, so hooks and the caller's references still see them."""
    parameters = [p for p in module.parameters() if p.device != device]
    home = [p.data for p in parameters]
    try:
        for p in parameters:
            p.data = p.data.to(device, non_blocking=True)
        yield
    finally:
        for p, data in zip(parameters, home):
            p.data = data
