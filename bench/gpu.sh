#!/usr/bin/env bash
# The GPU check: bnrepair's CUDA paths tested and benchmarked on the device, figures printed; about 5 minutes on
# one GPU. Run from anywhere, in an environment with bnrepair's test extras and CUDA builds of torch and
# onnxruntime (the gpu extra: pip uninstall -y onnxruntime && pip install '.[gpu]'):   bash bench/gpu.sh
# Exits 2 when torch sees no CUDA device, 1 when a step failed (the others still run).
set -uo pipefail
cd "$(dirname "$0")/.."
python - <<'PY' || { echo "gpu.sh: torch sees no CUDA device; run it on a GPU machine" >&2; exit 2; }
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(2)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x "
      f"{torch.cuda.get_device_name(0)}")
try:
    import onnxruntime
    print(f"onnxruntime {onnxruntime.__version__}: {', '.join(onnxruntime.get_available_providers())}")
except ImportError:
    print("onnxruntime not installed")
PY
status=0
step() {
    echo "== $*"
    timeout 240 "$@" || { echo "gpu.sh: failed: $*" >&2; status=1; }
}
# the tests with a CUDA branch: device moves, pinned copies, autocast, ONNX on the CUDA provider
step python -m pytest -q -p no:cacheprovider tests/frameworks/torch/test_torch_recalibrate.py tests/cli/test_export.py
# recalibration next to update_bn and a plain forward, float32 and under autocast
step python bench/bench_torch.py --device cuda --batches 16 --batch-size 128
step python bench/bench_torch.py --device cuda --batches 16 --batch-size 128 --amp bf16
step python bench/bench_torch.py --device cuda --batches 16 --batch-size 128 --amp fp16
# ONNX train-mode recalibration next to a plain pass, both on onnxruntime's CUDA provider
step python bench/bench_onnx.py --device cuda --model resnet18 --batch-size 64
# torchrun with NCCL: one rank per GPU (two ranks need two GPUs; NCCL refuses two ranks on one device)
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
step python bench/bench_distributed.py --device cuda --ranks 1 $([ "$gpus" -ge 2 ] && echo 2) --samples 8192
# the stream feeding a GPU model: decode throughput, train and eval ratios, memory
step python bench/bench_data.py --memory-images 1000 2000
exit $status
