"""Where MODEL comes from: a local directory, a hub id, or a short alias for a hub id."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import BadInputError, ResourceError

ALIASES = {
    "llama-70b": "meta-llama/Llama-2-70b-hf",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
}
# Only what a checkpoint needs: config, tokenizer, safetensors weights. Never pickles or code.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def resolve_model(model: str) -> Path:
    """A local checkpoint directory for MODEL, downloading from the hub if MODEL is an id or alias."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise BadInputError(f"cannot read model directory {path}: permission denied")
        return path
    if path.exists():
        raise BadInputError(f"MODEL {model} is a file; pass the directory that holds config.json")
    repo_id = ALIASES.get(model.lower(), model)
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_like_path and model.lower() not in ALIASES:
        raise BadInputError(
            f"no model directory {model}, and it is neither a hub id (owner/name) nor an alias. "
            f"Aliases: {', '.join(sorted(ALIASES))}."
        )
    return download(repo_id, model)


def download(repo_id: str, asked: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as err:  # offline, unknown repo, gated repo: each ends the same way for the user
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        offline = isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled))
        where = f"{asked} (hub id {repo_id})" if asked != repo_id else repo_id
        if offline:
            raise ResourceError(
                f"cannot download {where}: the Hugging Face hub is not reachable ({reason}). "
                f"Download it on a machine with network access (huggingface-cli download {repo_id}) "
                "and pass the local directory: streamprune run /path/to/model ..."
            ) from err
        raise BadInputError(
            f"cannot download {where} from the Hugging Face hub: {reason}. Check the id (and `hf auth login` "
            "for gated models such as Llama), or pass a local directory."
        ) from err
