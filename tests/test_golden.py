"""Golden outputs: the refactor into a layer stream and method plug-ins (and anything after it) must
not change a byte of what `run` writes. The sha256 of every output file but the run record (which
holds timings) was taken from main before the refactor (commit c80a9e9), on SmolLM2-135M in float32
on this CPU, 8 x 128 C4 calibration ids, batch size 1. The calibration record names the C4 file by its
absolute path, which differs from one clone to the next: its digest is taken without the path (the
file's sha256 stays in it)."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import C4

from streamprune import PruneConfig, prune
from streamprune.calibration import CALIBRATION_FILE
from streamprune.outdir import RECORD_FILE

pytestmark = pytest.mark.smollm2

CALIB = dict(calib=str(C4), nsamples=8, seqlen=128, batch_size=1, quiet=True)
RUNS = {
    "wanda-50": dict(method="wanda", sparsity=0.5),
    "wanda-2:4": dict(method="wanda", pattern="2:4"),
    "magnitude-50": dict(method="magnitude", sparsity=0.5),
}
GOLDEN = {
    "wanda-50": {
        "chat_template.jinja": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
        "config.json": "8e7955e0774d472f03e08cb5ec79e478ddc8bd75431d7f5d9cae482a66f3cc06",
        "generation_config.json": "a847b4a045b613dd1120e2306220539925bd58d4163b50fae2cb73781b2032b8",
        "model-00001-of-00001.safetensors": "a50a4d27fa9fefe9a41080902cd0c947495227d746a92ec4276e757b70faf978",
        "model.safetensors.index.json": "ad39c1400733a6d621220198be8f88d799c308fbd695dd3424fd09e2a4c7e0a8",
        "streamprune_calibration.json": "5d11d2ce2516e59aabbf0842db19296d009cfc8067315f89bce54088b6044cd4",
        "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
        "tokenizer_config.json": "156c41a2e14e6e6bd4286c506c38ee883a78e0f5ce165ad9bf63fe73ebf9e974"
    },
    "wanda-2:4": {
        "chat_template.jinja": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
        "config.json": "8e7955e0774d472f03e08cb5ec79e478ddc8bd75431d7f5d9cae482a66f3cc06",
        "generation_config.json": "a847b4a045b613dd1120e2306220539925bd58d4163b50fae2cb73781b2032b8",
        "model-00001-of-00001.safetensors": "ddd07f4bf9d0b287905bdcff8ec62cea6e0a657b8958c0a76055bf30f792a1b2",
        "model.safetensors.index.json": "ad39c1400733a6d621220198be8f88d799c308fbd695dd3424fd09e2a4c7e0a8",
        "streamprune_calibration.json": "5d11d2ce2516e59aabbf0842db19296d009cfc8067315f89bce54088b6044cd4",
        "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
        "tokenizer_config.json": "156c41a2e14e6e6bd4286c506c38ee883a78e0f5ce165ad9bf63fe73ebf9e974"
    },
    "magnitude-50": {
        "chat_template.jinja": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
        "config.json": "8e7955e0774d472f03e08cb5ec79e478ddc8bd75431d7f5d9cae482a66f3cc06",
        "generation_config.json": "a847b4a045b613dd1120e2306220539925bd58d4163b50fae2cb73781b2032b8",
        "model-00001-of-00001.safetensors": "6cacc042be378e2246a7a381b9a0156a64dc598a7c6b1d8481854ad050720211",
        "model.safetensors.index.json": "ad39c1400733a6d621220198be8f88d799c308fbd695dd3424fd09e2a4c7e0a8",
        "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
        "tokenizer_config.json": "156c41a2e14e6e6bd4286c506c38ee883a78e0f5ce165ad9bf63fe73ebf9e974"
    }
}


def digest(path) -> str:
    if path.name != CALIBRATION_FILE:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    record = json.loads(path.read_bytes())
    assert record.pop("source") == record.pop("file") == str(C4)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def output_digests(out) -> dict[str, str]:
    return {path.name: digest(path) for path in sorted(out.iterdir()) if path.is_file() and path.name != RECORD_FILE}


# support files copied from the source: their bytes are the source's (the model build writes the
# installed transformers' version into them), so they are compared with the source's, not a digest
COPIED = ("config.json", "generation_config.json")


def assert_golden(out, source, name: str) -> None:
    """`out`, pruned from `source` as RUNS[name] with CALIB, holds the bytes main wrote before the refactor."""
    written = output_digests(out)
    for copied in COPIED:
        assert (out / copied).read_bytes() == (source / copied).read_bytes()
        del written[copied]
    assert written == {file: sha for file, sha in GOLDEN[name].items() if file not in COPIED}


# Wanda's two runs are the ones test_smollm2 compares with the whole-model reference: checked there,
# on the same output (CI time: a SmolLM2 run is the slowest thing in the suite)
@pytest.mark.parametrize("name", ["magnitude-50"])
def test_output_bytes_equal_main_before_the_refactor(smollm2, tmp_path, name):
    out = tmp_path / name.replace(":", "-")
    prune(PruneConfig.from_flags(model=str(smollm2), out=out, **RUNS[name], **CALIB))
    assert_golden(out, smollm2, name)
