"""The shortened checkpoint: the kept blocks renumbered 0..K-1, every other tensor byte for byte,
and a config.json made consistent with fewer blocks."""

from __future__ import annotations

from tqdm import tqdm
from transformers import AutoConfig

from ..outdir import copy_support_files, support_bytes, write_json
from ..runstate import check_free_space
from ..stream import Source, check_weights_finite
from ..writer import CheckpointWriter
from .config import DepthConfig


def shortened_config(config: dict, kept: list[int]) -> dict:
    """config.json for the model made of blocks `kept` (old indices, ascending), changing only what
    must change: num_hidden_layers, every per-layer list, and Qwen2's max_window_layers (a
    vision-language checkpoint's in its text_config). A list the config class derives from the layer
    count when absent (Gemma's layer_types, from a sliding pattern) is written out first: derived
    again for fewer layers, it would give the kept blocks other attention kinds."""
    if isinstance(config.get("text_config"), dict):
        return {**config, "text_config": shortened_config(config["text_config"], kept)}
    full = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    derived = {key: getattr(full, key) for key in ("num_hidden_layers", "layer_types") if getattr(full, key, None)}
    config = {**config, **{key: value for key, value in derived.items() if key not in config}}
    num_layers = config["num_hidden_layers"]
    new = dict(config)
    new["num_hidden_layers"] = len(kept)
    for key, value in config.items():
        if isinstance(value, list) and len(value) == num_layers and key != "architectures":
            new[key] = [value[i] for i in kept]
    if isinstance(config.get("max_window_layers"), int):  # layers below it use full attention
        new["max_window_layers"] = sum(1 for i in kept if i < config["max_window_layers"])
    return new


def write_shortened(config: DepthConfig, source: Source, kept: list[int], healed: dict) -> tuple[list[str], int]:
    """The checkpoint of blocks `kept` (renumbered 0..K-1), everything else byte for byte but the
    tensors in `healed` (source name -> trained tensor), and its config.json made consistent;
    returns (shard files, bytes)."""
    info, names = source.checkpoint.tensors, source.layer_names
    renamed = [(name, name) for name in names[None]]
    for new, old in enumerate(kept):
        renamed += [(name, source.names.layer(new) + local) for name, local in names[old].items()]
    writer = CheckpointWriter(
        config.out, [(to, info[src].dtype, info[src].shape) for src, to in renamed], config.max_shard_bytes
    )
    support = {"config and tokenizer files": support_bytes(source.directory)}
    check_free_space(config.out, {"output checkpoint": writer.total_bytes, **support})
    try:
        for source_name, out_name in tqdm(renamed, desc="writing", unit="tensor", disable=config.quiet):
            tensor = healed[source_name] if source_name in healed else source.checkpoint.read(source_name)
            check_weights_finite(tensor, source_name)
            writer.write(out_name, tensor)
        # beside the weights before the index (written last): a full disk leaves nothing that looks finished
        copy_support_files(source.directory, config.out)
        write_json(config.out / "config.json", shortened_config(source.checkpoint.config, kept))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return writer.files, writer.total_bytes
