#!/usr/bin/env bash
# The one script a GPU call runs: GPU tests, kernel sweeps, layer and model benchmarks.
#   bash benchmarks/gpu_sweep.sh [tests] [kernels] [layer] [model] [layerquick] [trace] [timeline]
#   (default: the first four)
# Logs and JSON go to $OUT (the device tool's output folder) or ./gpu-out. Wheels of
# product-key-memory 0.3.0 and its pure-python dependencies are installed from .whl/ if present.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
steps=${*:-tests kernels layer model}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv
python3 -c "import torch, triton, triton.language as tl; print('torch', torch.__version__, 'triton', triton.__version__, 'topk', hasattr(tl, 'topk'), 'gather', hasattr(tl, 'gather'))"
for s in $steps; do
  echo "=== $s ($(date +%T))"
  case $s in
    tests) timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 tests 2>&1 | tee "$OUT/tests.log" | tail -40 ;;
    kernels) timeout 200 python3 benchmarks/kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -60 ;;
    layer) timeout 330 python3 benchmarks/layer.py --tuned "$OUT/kernels.json" --out "$OUT/layer.json" 2>&1 | tee "$OUT/layer.log" | tail -45 ;;
    layerquick) timeout 120 python3 benchmarks/layer.py --quick --out "$OUT/layer-quick.json" 2>&1 | tee "$OUT/layer-quick.log" | tail -30 ;;
    trace) timeout 120 python3 benchmarks/profile_layer.py trace > "$OUT/trace.txt" 2>&1; tail -3 "$OUT/trace.txt" ;;
    timeline) timeout 120 python3 benchmarks/timeline.py --out "$OUT/timeline.json" 2>&1 | grep "===" ;;
    model) timeout 100 python3 benchmarks/model.py --tuned "$OUT/kernels.json" --out "$OUT/model.json" 2>&1 | tee "$OUT/model.log" | tail -15 ;;
    *) echo "unknown step $s" ;;
  esac
done
echo "=== done ($(date +%T))"
