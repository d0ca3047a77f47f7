#!/usr/bin/env bash
# The speed suite on one GPU, in under 8 minutes; every script writes its JSON to benchmarks/results/
# (speed_steps_cuda.json, memory_depth_cuda.json, speed_sync_cuda.json, epoch_mnist_cuda.json,
# the last with the 100-epoch CCL mlp_mnist run, eager and as CUDA graphs: target <= 30 s).
# With two or more GPUs it also measures the parallel-CCL scaling model's parameters (FLOP rate,
# per-layer cost, NCCL latency and bandwidth: parallel_model_cuda.json) and epoch times of BP, CCL
# and 2-rank parallel CCL on mlp_mnist (parallel_ccl_cuda.json) and of the F/G split on ae_mnist
# (parallel_ccl_ae_mnist_fg_cuda.json).
#   bash benchmarks/gpu.sh            (from anywhere; MNIST is read from ../shared/datasets)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run the CPU suite instead')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
start=$SECONDS
step() { echo "== $* ($((SECONDS - start)) s)"; }

step "step time, samples/s, FLOPs, MFU per model (bf16 autocast)"
timeout 100 python benchmarks/speed_steps.py --threads 4 --repeats 20 || echo "!! failed or timed out (exit $?); continuing"
step "MLPs eager vs CUDA graphs, both methods in one run"
timeout 80 python benchmarks/speed_steps.py --threads 4 --repeats 30 --models mlp_small,mlp_mnist,mlp_cifar --compile both --tag _mlp_compile_both || echo "!! failed or timed out (exit $?); continuing"
step "peak step memory vs depth"
timeout 40 python benchmarks/memory_depth.py --threads 4 || echo "!! failed or timed out (exit $?); continuing"
step "no host sync per step"
timeout 40 python benchmarks/speed_sync.py || echo "!! failed or timed out (exit $?); continuing"
step "mlp_mnist epoch split + 100-epoch CCL run"
timeout 210 python benchmarks/epoch_mnist.py --threads 4 --repeats 2 --run-epochs 100 --run-compiled || echo "!! failed or timed out (exit $?); continuing"
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step "parallel CCL: scaling model measured on the GPUs (FLOP rate, per-layer cost, NCCL p2p)"
  timeout 120 python benchmarks/parallel_model.py --device cuda --out parallel_model_cuda.json || echo "!! failed or timed out (exit $?); continuing"
  step "parallel CCL: epoch time, BP vs CCL vs 2 ranks (one GPU each)"
  timeout 240 python benchmarks/parallel_ccl.py --device cuda --epochs 2 --repeats 1 --tag _cuda || echo "!! failed or timed out (exit $?); continuing"
  step "parallel CCL: the F/G split of ae_mnist (F on one GPU, G on the other) vs BP and CCL"
  timeout 150 python benchmarks/parallel_ccl.py --device cuda --recipe ae_mnist --parallel networks --epochs 2 --repeats 1 --tag _ae_mnist_fg_cuda || echo "!! failed or timed out (exit $?); continuing"
fi
step "done"
ls -l benchmarks/results/*_cuda.json
