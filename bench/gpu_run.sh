#!/usr/bin/env bash
# The GPU measurements recorded in BENCHMARKS.md, as one script (at most 580 s of timeouts) for a lent GPU machine whose image has torch but not
# diffusers (wheels carried in .whl/, see the device notes). Writes logs and JSON to $OUT (default: bench/results/gpu).
#   bash bench/gpu_run.sh
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/machine.txt"

# 1. The training step as train_tread.py runs it (bench/throughput.py): stock DiT, ours per-block / shared, dense vs
#    routed (paper route), bf16 autocast with fp32 weights, per-GPU batch 32; eager, regional compile, CUDA graphs.
#    With OFFICIAL_TREAD=<CompVis/tread checkout> (and timm importable) the official code runs as two more arms.
OFFICIAL=${OFFICIAL_TREAD:+--official_tread $OFFICIAL_TREAD}
timeout 140 python3 bench/throughput.py --models DiT-B/2 DiT-XL/2 --batch_size 32 --precision bf16 --mode eager \
    --repeats 10 --warmup 3 --profile $OFFICIAL --json "$OUT/throughput_eager.json" 2>&1 | tee "$OUT/throughput_eager.md"
timeout 170 python3 bench/throughput.py --models DiT-B/2 DiT-XL/2 --batch_size 32 --precision bf16 --mode compile \
    --repeats 10 --warmup 3 $OFFICIAL --json "$OUT/throughput_compile.json" 2>&1 | tee "$OUT/throughput_compile.md"
timeout 110 python3 bench/throughput.py --models DiT-B/2 --batch_size 32 --precision bf16 --mode cudagraphs \
    --repeats 10 --warmup 3 --json "$OUT/throughput_cudagraphs.json" 2>&1 | tee "$OUT/throughput_cudagraphs.md"

# 2. The state-space backbone on ImageNet-256-shaped latents (4x32x32, 256 tokens), fp32.
timeout 60 python3 bench/throughput.py --model_type ssm --device cuda --models SSM-S/2 SSM-B/2 --in_channels 4 \
    --sample_size 32 --batch_size 32 --repeats 5 --warmup 2 2>&1 | tee "$OUT/ssm_throughput.md"

# 3. The README's quick start (the default digits run) on the GPU, bf16 autocast: wall time and sample grid.
start=$(date +%s)
timeout 100 accelerate launch --num_processes 1 --mixed_precision bf16 training/train_tread.py \
    --output_dir /tmp/tread-digits 2>&1 | tail -n 25 | tee "$OUT/train_digits.log"
echo "train_tread.py default run: $(( $(date +%s) - start )) s wall (exit ${PIPESTATUS[0]})" | tee -a "$OUT/train_digits.log"
cp /tmp/tread-digits/samples/final_grid.png "$OUT/digits_grid.png" 2>/dev/null || true
