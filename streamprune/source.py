"""Where MODEL comes from: a local directory, a hub id, or a short alias for a hub id."""

from __future__ import annotations

import errno
import functools
import os
import socket
import urllib.parse
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
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3.3-70b": "meta-llama/Llama-3.3-70B-Instruct",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-2-27b": "google/gemma-2-27b",
    "gemma-3-270m": "google/gemma-3-270m",
    "gemma-3-1b": "google/gemma-3-1b-pt",
    "gemma-3-4b": "google/gemma-3-4b-pt",
    "gemma-3-12b": "google/gemma-3-12b-pt",
    "gemma-3-27b": "google/gemma-3-27b-pt",
    "olmo-2-7b": "allenai/OLMo-2-1124-7B",
    "olmo-2-13b": "allenai/OLMo-2-1124-13B",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "phi-4": "microsoft/phi-4",
    "phi-4-mini": "microsoft/Phi-4-mini-instruct",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "mixtral-8x22b": "mistralai/Mixtral-8x22B-v0.1",
    "qwen1.5-moe-a2.7b": "Qwen/Qwen1.5-MoE-A2.7B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
    "olmoe-1b-7b": "allenai/OLMoE-1B-7B-0924",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
}


def _llama(
    hidden, intermediate, layers, heads, kv_heads, vocab, positions, dtype, model_type="llama", tied=False,
    head_dim=None,
):  # fmt: skip
    architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                    "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                    "olmo2": "Olmo2ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                    "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}  # fmt: skip
    return {
        "architectures": [architecture[model_type]],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": positions,
        "torch_dtype": dtype,
        "tie_word_embeddings": tied,
        **({"head_dim": head_dim} if head_dim else {}),
    }


def _moe(dense: dict, experts: int, per_token: int, expert_intermediate: int, **fields) -> dict:
    """A mixture-of-experts config: `dense`'s attention and sizes, `experts` MLPs of width
    `expert_intermediate` a block, `per_token` of them for each token; as the hub's config names
    them (Mixtral's: num_local_experts and intermediate_size)."""
    if dense["model_type"] == "mixtral":
        return {**dense, "num_local_experts": experts, "num_experts_per_tok": per_token,
                "intermediate_size": expert_intermediate, **fields}  # fmt: skip
    return {**dense, "num_experts": experts, "num_experts_per_tok": per_token,
            "moe_intermediate_size": expert_intermediate, **fields}  # fmt: skip


def _gemma3_vision_language(hidden, intermediate, layers, heads, kv_heads, head_dim):
    """Gemma 3 from 4B up: the language model's sizes and the SigLIP vision tower all of them share."""
    text = _llama(hidden, intermediate, layers, heads, kv_heads, 262208, 131072, "bfloat16", "gemma3_text",
                  tied=True, head_dim=head_dim)  # fmt: skip
    vision = {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
              "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}  # fmt: skip
    return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "torch_dtype": "bfloat16",
            "text_config": {k: v for k, v in text.items() if k != "architectures"}, "vision_config": vision}  # fmt: skip


# The sizes `plan` needs for each alias, as in the config.json each points to on the hub, so that
# planning an alias needs no network.
ALIAS_CONFIGS = {
    "meta-llama/Llama-2-7b-hf": _llama(4096, 11008, 32, 32, 32, 32000, 4096, "float16"),
    "meta-llama/Llama-2-13b-hf": _llama(5120, 13824, 40, 40, 40, 32000, 4096, "float16"),
    "meta-llama/Llama-2-70b-hf": _llama(8192, 28672, 80, 64, 8, 32000, 4096, "float16"),
    "meta-llama/Meta-Llama-3-8B": _llama(4096, 14336, 32, 32, 8, 128256, 8192, "bfloat16"),
    "meta-llama/Meta-Llama-3-70B": _llama(8192, 28672, 80, 64, 8, 128256, 8192, "bfloat16"),
    "meta-llama/Llama-3.1-8B": _llama(4096, 14336, 32, 32, 8, 128256, 131072, "bfloat16"),
    "meta-llama/Llama-3.1-70B": _llama(8192, 28672, 80, 64, 8, 128256, 131072, "bfloat16"),
    "mistralai/Mistral-7B-v0.1": _llama(4096, 14336, 32, 32, 8, 32000, 32768, "bfloat16", "mistral"),
    "Qwen/Qwen2-7B": _llama(3584, 18944, 28, 28, 4, 152064, 131072, "bfloat16", "qwen2"),
    "HuggingFaceTB/SmolLM2-135M": _llama(576, 1536, 30, 9, 3, 49152, 8192, "bfloat16", tied=True),
    "meta-llama/Llama-3.2-1B": _llama(2048, 8192, 16, 32, 8, 128256, 131072, "bfloat16", tied=True, head_dim=64),
    "meta-llama/Llama-3.2-3B": _llama(3072, 8192, 28, 24, 8, 128256, 131072, "bfloat16", tied=True, head_dim=128),
    "meta-llama/Llama-3.3-70B-Instruct": _llama(8192, 28672, 80, 64, 8, 128256, 131072, "bfloat16"),
    "Qwen/Qwen3-0.6B": _llama(1024, 3072, 28, 16, 8, 151936, 40960, "bfloat16", "qwen3", tied=True, head_dim=128),
    "Qwen/Qwen3-1.7B": _llama(2048, 6144, 28, 16, 8, 151936, 40960, "bfloat16", "qwen3", tied=True, head_dim=128),
    "Qwen/Qwen3-4B": _llama(2560, 9728, 36, 32, 8, 151936, 40960, "bfloat16", "qwen3", tied=True, head_dim=128),
    "Qwen/Qwen3-8B": _llama(4096, 12288, 36, 32, 8, 151936, 40960, "bfloat16", "qwen3", head_dim=128),
    "Qwen/Qwen3-32B": _llama(5120, 25600, 64, 64, 8, 151936, 40960, "bfloat16", "qwen3", head_dim=128),
    "google/gemma-2-2b": _llama(2304, 9216, 26, 8, 4, 256000, 8192, "float32", "gemma2", tied=True, head_dim=256),
    "google/gemma-2-9b": _llama(3584, 14336, 42, 16, 8, 256000, 8192, "float32", "gemma2", tied=True, head_dim=256),
    "google/gemma-2-27b": _llama(4608, 36864, 46, 32, 16, 256000, 8192, "float32", "gemma2", tied=True, head_dim=128),
    "google/gemma-3-270m": _llama(640, 2048, 18, 4, 1, 262144, 32768, "bfloat16", "gemma3_text", tied=True, head_dim=256),
    "google/gemma-3-1b-pt": _llama(1152, 6912, 26, 4, 1, 262144, 32768, "bfloat16", "gemma3_text", tied=True, head_dim=256),
    "google/gemma-3-4b-pt": _gemma3_vision_language(2560, 10240, 34, 8, 4, 256),
    "google/gemma-3-12b-pt": _gemma3_vision_language(3840, 15360, 48, 16, 8, 256),
    "google/gemma-3-27b-pt": _gemma3_vision_language(5376, 21504, 62, 32, 16, 128),
    "allenai/OLMo-2-1124-7B": _llama(4096, 11008, 32, 32, 32, 100352, 4096, "float32", "olmo2"),
    "allenai/OLMo-2-1124-13B": _llama(5120, 13824, 40, 40, 40, 100352, 4096, "float32", "olmo2"),
    "microsoft/Phi-3-mini-4k-instruct": _llama(3072, 8192, 32, 32, 32, 32064, 4096, "bfloat16", "phi3"),
    "microsoft/phi-4": _llama(5120, 17920, 40, 40, 10, 100352, 16384, "bfloat16", "phi3"),
    "microsoft/Phi-4-mini-instruct": _llama(3072, 8192, 32, 24, 8, 200064, 131072, "bfloat16", "phi3", tied=True),
    "mistralai/Mixtral-8x7B-v0.1": _moe(_llama(4096, 14336, 32, 32, 8, 32000, 32768, "bfloat16", "mixtral"), 8, 2, 14336),
    "mistralai/Mixtral-8x22B-v0.1": _moe(_llama(6144, 16384, 56, 48, 8, 32000, 65536, "bfloat16", "mixtral"), 8, 2, 16384),
    "Qwen/Qwen1.5-MoE-A2.7B": _moe(_llama(2048, 5632, 24, 16, 16, 151936, 8192, "bfloat16", "qwen2_moe"), 60, 4, 1408,
                                   shared_expert_intermediate_size=5632),  # fmt: skip
    "Qwen/Qwen3-30B-A3B": _moe(_llama(2048, 6144, 48, 32, 4, 151936, 40960, "bfloat16", "qwen3_moe", head_dim=128), 128, 8,
                               768, norm_topk_prob=True),  # fmt: skip
    "Qwen/Qwen3-235B-A22B": _moe(_llama(4096, 12288, 94, 64, 4, 151936, 40960, "bfloat16", "qwen3_moe", head_dim=128), 128,
                                 8, 1536, norm_topk_prob=True),  # fmt: skip
    "allenai/OLMoE-1B-7B-0924": _moe(_llama(2048, 1024, 16, 16, 16, 50304, 4096, "float32", "olmoe"), 64, 8, 1024),
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
    return download(hub_id(model), model)


def hub_id(model: str) -> str:
    """The hub id MODEL names (itself, or the id of an alias); refused when it is neither."""
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_like_path and model.lower() not in ALIASES:
        raise BadInputError(
            f"no model directory {model}, and it is neither a hub id (owner/name) nor an alias. "
            f"Aliases: {', '.join(sorted(ALIASES))}."
        )
    return ALIASES.get(model.lower(), model)


def first_line(err: Exception) -> str:
    """An exception's message cut to its first line (hub errors run to many), or its type's name."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def hub_reachable() -> bool:
    """Whether the hub answers at all, found out in seconds: offline, huggingface_hub retries each
    request for half a minute before it gives up. Without the hub, downloads use the local cache.

    Every download asks this first, so it is also where huggingface_hub's requests get a time limit
    where they have none (see `_fill_timeouts`)."""
    _limit_hub_requests()
    return _hub_answers()


@functools.cache
def _hub_answers() -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; let huggingface_hub ask it
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError:
        return False
    return True


def _fill_timeouts(request) -> None:
    """A request hook: what huggingface_hub sends without a time limit (a repo's info and file
    listing: `timeout=None`) gets the limit of its per-file metadata requests, HF_HUB_ETAG_TIMEOUT
    (10 s by default). Without one, a hub (or proxy) that accepts the connection and never answers
    hangs `run` for ever; with it the command says so and exits 4."""
    from huggingface_hub import constants

    timeout = dict(request.extensions.get("timeout") or {})
    if all(timeout.get(kind) is not None for kind in ("connect", "read", "write", "pool")):
        return
    limit = float(constants.HF_HUB_ETAG_TIMEOUT)
    request.extensions["timeout"] = {kind: limit if timeout.get(kind) is None else timeout[kind]
                                     for kind in ("connect", "read", "write", "pool")}  # fmt: skip


def _limit_hub_requests() -> None:
    """Add `_fill_timeouts` to huggingface_hub's shared HTTP client (made again after a fork, hence
    checked before every download)."""
    from huggingface_hub import get_session

    session = get_session()
    hooks = session.event_hooks
    if _fill_timeouts not in hooks.get("request", []):
        session.event_hooks = {**hooks, "request": [*hooks.get("request", []), _fill_timeouts]}


def _causes(err: BaseException):
    """`err` and what it was raised from, nearest first (huggingface_hub wraps the cause of a
    failure in errors of its own: a timeout in 'cannot find the files in the local cache')."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _class_names(err: BaseException) -> set[str]:
    # httpx (huggingface_hub 1.x) or httpx2 (2.x): the same exception names in either
    return {cls.__name__ for cls in type(err).__mro__}


def _diagnose(err: Exception) -> tuple[str, str]:
    """(kind, reason): why a download failed, in words the user can act on, and what kind of
    failure it is: 'offline' (no hub, and not in the cache), 'network' (the hub failed mid-way:
    running again can work; exit 4), 'disk' (the cache's disk is full; exit 4) or 'input' (no such
    repo, revision or file; exit 3).
    huggingface_hub's own messages run to many lines, and say '404 Client Error.' for a missing file."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        missing = f"it is not (wholly) in the hub cache ({cache})"
        return "offline", f"HF_HUB_OFFLINE is set, and {missing}; unset HF_HUB_OFFLINE to download it"
    if not hub_reachable():
        where = f"no connection to the hub ({constants.ENDPOINT}) from this machine"
        return "offline", f"{where}, and it is not in the hub cache ({cache})"
    again = f"run the same command again (the files already downloaded stay in the hub cache, {cache})"
    for cause in _causes(err):
        names = _class_names(cause)
        if isinstance(cause, GatedRepoError):
            return "input", "the repo is gated: ask for access on its page on the hub, then log in (hf auth login)"
        if isinstance(cause, RepositoryNotFoundError):
            return "input", "the hub has no such repo (check the id; a private or gated one needs hf auth login)"
        if isinstance(cause, RevisionNotFoundError):
            return "input", "the hub has no such revision of the repo"
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status, url = cause.response.status_code, str(cause.response.url)
            name = urllib.parse.unquote(url.split("/resolve/", 1)[1].split("/", 1)[-1]) if "/resolve/" in url else url
            said = f"the hub answered {status} {cause.response.reason_phrase} for {name.split('?')[0]}"
            if "EntryNotFoundError" in names or status == 404:
                return "input", said
            if status >= 500 or status in (408, 429):
                return "network", f"{said}; {again}"
            login = "; log in (hf auth login) with a token that may read it" if status in (401, 403) else ""
            return "input", said + login
        if "TimeoutException" in names:
            return "network", f"the hub stopped answering ({type(cause).__name__}: {first_line(cause)}); {again}"
        if names & {"RemoteProtocolError", "NetworkError", "ProtocolError"}:
            return "network", f"the connection broke off mid-download ({first_line(cause)}); {again}"
        if isinstance(cause, OSError) and str(cause).startswith("Consistency check failed"):
            return "network", f"a file arrived incomplete ({first_line(cause)}); {again}"
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return "disk", f"the disk of the hub cache ({cache}) is full; free space, or set HF_HOME to a bigger disk"
    return "input", first_line(err)


def hub_failure(err: Exception) -> str:
    """Why a download failed, in a line the user can act on."""
    return _diagnose(err)[1]


def download(repo_id: str, asked: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=not hub_reachable()))
    except Exception as err:  # offline, unknown repo, a cut download: each ends the same way for the user
        kind, reason = _diagnose(err)
        where = f"{asked} (hub id {repo_id})" if asked != repo_id else repo_id
        if kind == "offline":
            raise ResourceError(
                f"cannot download {where}: the Hugging Face hub is not reachable ({reason}). Download it where "
                f"the hub is reachable (hf download {repo_id} --local-dir DIR), then pass its local directory in "
                f"place of {asked}."
            ) from err
        error = BadInputError if kind == "input" else ResourceError
        raise error(
            f"cannot download {where} from the Hugging Face hub: {reason}. "
            f"Or pass a local directory in place of {asked}."
        ) from err


def fetch_config(model: str) -> tuple[dict, str]:
    """config.json of MODEL and where it came from, downloading nothing else: what `plan` needs."""
    from .checkpoint import parse_json

    path = Path(model).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise BadInputError(f"{path} has no config.json; pass a checkpoint directory, a hub id or an alias")
    elif path.is_file() and path.name.endswith(".json"):
        config_path = path
    elif ALIASES.get(model.lower()) in ALIAS_CONFIGS:
        repo_id = ALIASES[model.lower()]
        return ALIAS_CONFIGS[repo_id], f"the sizes of {repo_id} built into streamprune"
    else:
        config_path = download_file(hub_id(model), "config.json", model)
    try:
        return parse_json(config_path.read_bytes(), str(config_path)), str(config_path)
    except OSError as err:
        raise BadInputError(f"cannot read {config_path}: {err}") from err


def download_file(repo_id: str, filename: str, asked: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=not hub_reachable()))
    except Exception as err:
        kind, reason = _diagnose(err)
        error = BadInputError if kind == "input" else ResourceError
        raise error(
            f"cannot download {filename} of {asked} (hub id {repo_id}): {reason}. Or pass a local "
            f"directory or its config.json: streamprune plan /path/to/model ..."
        ) from err
