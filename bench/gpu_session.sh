#!/usr/bin/env bash
# Issue 14's GPU figures in device calls of at most 10 minutes, each part under its own time limit
# so one that hangs leaves the others' lines. Run from the repository root on the device machine
# with `carry=[".whl", ".peers"]` (bench/README.md: "Running the GPU scripts beside Tunix");
# writes JSON lines under $OUT (or ./gpu_out), one file a part, every part's stderr into
# stderr.log. The roofline's bandwidth is 3.35 TB/s on an H100, else 4.3 (H200).
#
#   bash bench/gpu_session.sh sampler    # laserjax (XLA and Pallas decode attention) and Tunix
#                                        # samplers, ratios (about 8.5 min)
#   bash bench/gpu_session.sh train      # train step vs PyTorch, long-tailed lengths (about 9 min)
#   bash bench/gpu_session.sh goals      # the GPU figures in one call: the Pallas kernel's
#                                        # tests compiled for Triton, the 0.5B / 1.5B samplers
#                                        # (XLA decode over plain and augmented caches; the
#                                        # Pallas kernel at 0.5B) beside Tunix at full
#                                        # vocabulary, the 0.5B train step with cuDNN attention
#                                        # beside PyTorch (about 7 min)
#   bash bench/gpu_session.sh profile    # where the time goes: kernels per decode step and per
#                                        # train step, and the variants that test the suspects
#                                        # (one decode window; cuDNN attention) (about 5 min)
#
# The limits come from the first H200 session (bench/README.md): the sampler's warm-up call
# compiles for 30-37 s per model and top-k, Tunix's four measurements took 76 s in all, and the
# LaSeR train step's first call compiled for 94 s at 0.5B with attention in blocks, 31-36 s dense.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
HBM=(--hbm-tb-s 4.3)
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 && HBM=(--hbm-tb-s 3.35)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.peers:$PWD

part() {  # part NAME SECONDS COMMAND...: run one part, its lines to $OUT/NAME.jsonl
    local name=$1 secs=$2
    shift 2
    echo "== $name ($(date -u +%T), limit ${secs}s)"
    echo "== $name" >>"$OUT/stderr.log"
    timeout "$secs" "$@" 2>>"$OUT/stderr.log" | tee "$OUT/$name.jsonl"
    echo "== $name rc=${PIPESTATUS[0]} ($(date -u +%T))"
    tail -3 "$OUT/stderr.log"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', \
transformers.__version__, jax.devices())"

case "${1:-sampler}" in
sampler)
    # Batch 64, prompt 256, 512 new tokens, temperature 1: the peer's settings.
    part laserjax_sampler 240 python3 bench/sampler_gpu.py 0.5b 1.5b --top-k 0 50 "${HBM[@]}"
    part laserjax_sampler_pallas 130 python3 bench/sampler_gpu.py 0.5b 1.5b --top-k 0 \
        --decode-impl pallas "${HBM[@]}"
    part tunix_sampler 130 python3 .peers/tunix_sampler_bench.py 1.5b --extra-top-k 50
    python3 bench/sampler_gpu.py --ratios-only "$OUT/laserjax_sampler.jsonl" \
        "$OUT/laserjax_sampler_pallas.jsonl" "$OUT/tunix_sampler.jsonl" \
        | tee "$OUT/sampler_ratios.jsonl"
    ;;
train)
    # 8 x 1024 tokens, bf16, each side in its own process; then long-tailed lengths at the 0.5B
    # shape (float32, both sides 32 rows in flight).
    part train_step 390 python3 bench/train_step_gpu.py 0.5b 1.5b --worker-timeout 150
    part tunix_lengths 160 python3 bench/tunix_lengths.py --rounds 1 --refill 1 4 --vocab 151936 \
        --hidden 896 --intermediate 4864 --layers 24 --heads 14 --kv-heads 2 --head-dim 64
    ;;
goals)
    part kernel_tests 60 env JAX_PLATFORMS=cuda XLA_FLAGS= python3 -m pytest -q -p no:cacheprovider \
        tests/test_decode_kernel.py -k "part_attention or merged"
    part laserjax_sampler_pallas 75 python3 bench/sampler_gpu.py 0.5b --top-k 0 \
        --decode-impl pallas "${HBM[@]}"
    part laserjax_sampler 200 python3 bench/sampler_gpu.py 0.5b 1.5b --top-k 0 \
        --kv-layout plain augmented "${HBM[@]}"
    part tunix_sampler 90 python3 .peers/tunix_sampler_bench.py 1.5b
    python3 bench/sampler_gpu.py --ratios-only "$OUT/laserjax_sampler.jsonl" \
        "$OUT/laserjax_sampler_pallas.jsonl" "$OUT/tunix_sampler.jsonl" \
        | tee "$OUT/sampler_ratios.jsonl"
    part train_step 120 python3 bench/train_step_gpu.py 0.5b --attention-impl cudnn \
        --worker-timeout 60
    ;;
profile)
    # The 0.5B sampler with the default decode windows and with one window (fewer kernels per
    # step: is the step bound by kernel count?), each followed by its profiled decode loop; then
    # the 0.5B train step with cuDNN's flash attention, profiled for one step, beside PyTorch.
    # (The Pallas decode kernel, measured by `goals`, is slower than the XLA decode.)
    part sampler_profile 150 python3 bench/sampler_gpu.py 0.5b --top-k 0 --windows auto one \
        --profile "${HBM[@]}"
    part train_profile 170 python3 bench/train_step_gpu.py 0.5b --attention-impl cudnn \
        --profile --worker-timeout 80
    ;;
*)
    echo "usage: bash bench/gpu_session.sh sampler|train|profile|goals" >&2
    exit 2
    ;;
esac
