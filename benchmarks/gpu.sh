#!/usr/bin/env bash
# Ours against transformers on one CUDA GPU (about 2.5 minutes on one H100, a minute of it compiling).
#
# Builds the real idefics2-8b shapes (SigLIP-so400m vision tower, 64-latent perceiver, Mistral-7B decoder)
# with random bfloat16 weights directly on the GPU: nothing is downloaded, nothing is written to disk but
# the processor's small tokenizer files. Then:
#   1. the GPU tests: CUDA-graph decoding gives the eager tokens, CUDA generation the CPU tokens, and the torch
#      image-processing backend on the GPU the CPU pixels;
#   2. benchmarks/bench.py --device cuda --config 8b: one chat turn with one 480x640 image (splitting on),
#      decode at batch 1 / 8 / 16, ours (plain and with compiled decode steps) and transformers interleaved
#      in one process, table + JSON.
#   3. benchmarks/bench_serving.py --device cuda --config 8b: 32 requests at once, one split 480x640 image
#      each, through the continuous-batching engine (prefill budgets raised for the GPU) and through HTTP
#      (idefics2 serve's app), against static batching; TTFT / TPOT / ITL percentiles and throughput.
#   4. benchmarks/bench_training.py --device cuda --config 8b: LoRA fine-tuning (rank 8 on every projection of
#      the decoder and the connector) of the 8b shapes in bfloat16 with gradient checkpointing, ours (plain
#      and packed) against transformers + PEFT, each run in its own process on the same weights, adapter and
#      batches (one split image + a 100-300-token answer per example): examples/s, trained tokens/s,
#      torch.cuda.max_memory_allocated during training and the losses.
# Goals printed at the end: decode batch 1 >= 150 tok/s and >= 4x transformers, time to first token
# <= 120 ms, batch 16 throughput >= 8x batch 1; serving: 32 streams >= 2,500 output tokens/s with p99 time to
# first token <= 1 s.
#
#     bash benchmarks/gpu.sh [extra bench.py flags, e.g. --repeats 2]     (PYTHON=... picks the interpreter)
#
# Needs the test extras (pip install -e ".[test]"); without the mistral-common package, point
# MISTRAL_TOKENIZER_MODEL at a copy of its data/tokenizer.model.v1.
set -uo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
"$PYTHON" - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA GPU"
props = torch.cuda.get_device_properties(0)
print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}")
PY
status=0  # a failing test does not stop the benchmark; the script's exit status reports it
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_fast_path.py tests/test_image_processing.py \
    -k cuda || status=$?
timeout 390 "$PYTHON" benchmarks/bench.py --device cuda --config 8b --repeats 3 --new-tokens 64 \
    --batch-sizes 8 16 --compile --json "${BENCH_JSON:-gpu_bench.json}" "$@" || status=$?
timeout 300 "$PYTHON" benchmarks/bench_serving.py --device cuda --config 8b --requests 32 --max-batch 32 \
    --split --image-size 480x640 --new-tokens 64 --prefill-chunk 8192 --vision-chunk 65536 --modes engine http static \
    --json "${SERVING_JSON:-gpu_serving.json}" || status=$?
timeout 420 "$PYTHON" benchmarks/bench_training.py --device cuda --config 8b --dtype bfloat16 \
    --gradient-checkpointing --steps 8 --batch-size 4 --runs transformers+peft ours ours+packing \
    --json "${TRAINING_JSON:-gpu_training.json}" || status=$?
exit $status
