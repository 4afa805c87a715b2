#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run (for a lent device machine): build the kernels, run the GPU
# tests (kernels, 2:4, the whole pipeline), benchmark the kernels and the 2:4 semi-structured path. Logs and
# result files land in $OUT (eval/results/ when OUT is unset). Each step runs even if one before it failed.
#
#     bash eval/gpu_check.sh
set -uo pipefail
OUT=${OUT:-eval/results}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
log=$OUT/gpu-check.log

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nvcc --version | tail -2
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
           'transformers', transformers.__version__)"
  start=$SECONDS
  $PY -c "from compressor import kernels; assert kernels.extension() is not None, kernels.unavailable_reason()" \
    && echo "kernels built in $((SECONDS - start)) s"
  $PY -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_semi_structured_gpu.py tests/test_pipeline_gpu.py
  echo "GPU tests exit $?"
  $PY eval/bench_kernels.py && echo "bench_kernels exit 0"
  $PY eval/bench_semi_structured.py && echo "bench_semi_structured exit 0"
} 2>&1 | tee "$log"
[ "$OUT" = eval/results ] || cp eval/results/kernels-*.* eval/results/semi-structured-*.* "$OUT"/ 2>/dev/null
exit 0
