#!/usr/bin/env bash
# The GPU benchmarks and GPU tests in one command, on one GPU:
#   bash benchmarks/gpu_sweep.sh [tests] [kernels] [layer] [model] [decode] [timeline]   (default: these six)
#   bash benchmarks/gpu_sweep.sh train small     (the training step of both presets, 3 rounds of enwik8-small;
#                                                 one layer's step against the FFN's: ~8 min, not in the default)
#   ENWIK8=path/enwik8.gz bash benchmarks/gpu_sweep.sh compile   (enwik8-small's step eager and under
#          torch.compile(mode="reduce-overhead"), 2 rounds; then `pkmem train` 400 steps with and without
#          the memory, eager and compile_mode=reduce-overhead: metrics.jsonl of each in $OUT/loop-*; ~7 min)
# Each benchmark writes <name>-<gpu>.json and a log to $OUT (default ./gpu-out); copy the JSON over
# benchmarks/results/ to update the committed results. The layer and model benchmarks measure the
# library's default kernel configs (kernels.py sweeps the alternatives). Wheels of product-key-memory 0.3.0 and its pure-python dependencies are
# installed from .whl/ if present (for machines without a package index; the layer and model
# benchmarks compare against it). The train and small steps need pkmem[train]'s omegaconf (and its
# antlr4-python3-runtime): on a GPU image without them, put their wheels in .whl/ too
# (`pip download --no-deps -d .whl omegaconf==2.3.0`; `pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3`).
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
steps=${*:-tests kernels layer model decode timeline}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
gpu=$(cd benchmarks && python3 -c "from common import gpu_slug; print(gpu_slug())")
for s in $steps; do
  echo "=== $s ($(date +%T))"
  case $s in
    tests) timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 tests 2>&1 | tee "$OUT/tests.log" | tail -40 ;;
    kernels) timeout 200 python3 benchmarks/kernels.py --out "$OUT/kernels-$gpu.json" 2>&1 | tee "$OUT/kernels.log" | tail -60 ;;
    layer) timeout 330 python3 benchmarks/layer.py --out "$OUT/layer-$gpu.json" 2>&1 | tee "$OUT/layer.log" | tail -45 ;;
    model) timeout 100 python3 benchmarks/model.py --out "$OUT/model-$gpu.json" 2>&1 | tee "$OUT/model.log" | tail -15 ;;
    decode) timeout 150 python3 benchmarks/decode.py --out "$OUT/decode-$gpu.json" 2>&1 | tee "$OUT/decode.log" | tail -10 ;;
    timeline) timeout 120 python3 benchmarks/timeline.py --out "$OUT/timeline-$gpu.json" 2>&1 | tee "$OUT/timeline.log" | grep "===" ;;
    train)
      v="no memory,adamw fp32,sparse_adam fp32,lazy_adam fp32,lazy_adam bf16"
      timeout 240 python3 benchmarks/train_step.py --presets enwik8-small --variants "$v" --steps 30 --rounds 3 \
        --out "$OUT/train_step-enwik8-small-rounds-$gpu.json" 2>&1 | tee "$OUT/train_small.log" | tail -8
      timeout 250 python3 benchmarks/train_step.py --presets paper-12l-1024 --variants "$v" \
        --out "$OUT/train_step-paper-12l-1024-$gpu.json" 2>&1 | tee "$OUT/train_paper.log" | tail -8 ;;
    compile)
      v="no memory,adamw fp32,lazy_adam fp32,lazy_adam bf16"
      timeout 300 python3 benchmarks/train_step.py --presets enwik8-small --variants "$v" --steps 30 --rounds 2 \
        --compile both --compile-mode reduce-overhead --out "$OUT/train_step-enwik8-small-reduce-overhead-$gpu.json" \
        2>&1 | tee "$OUT/train_compile.log" | tail -10
      common="--config enwik8-small --data-path ${ENWIK8:-.data/enwik8.gz} --max-steps 400 --no-progress"
      common="$common max_time_s=null eval_every=0 final_eval_tokens=262144 log_every=50"
      ro="compile=true compile_mode=reduce-overhead"
      for run in "memory-ro|$ro" "none-ro|mem_layers=[] $ro" "memory-eager|" "none-eager|mem_layers=[]"; do
        name=${run%%|*}
        rm -rf "/tmp/pkmem-loop-$name"
        # shellcheck disable=SC2086  # the overrides are words
        timeout 120 python3 -m pkmem train $common --out "/tmp/pkmem-loop-$name" ${run#*|} >"$OUT/loop-$name.log" 2>&1
        grep -E "done:|Error" "$OUT/loop-$name.log" | tail -2
        cp "/tmp/pkmem-loop-$name/metrics.jsonl" "$OUT/loop-$name.jsonl"
      done ;;
    small) timeout 120 python3 benchmarks/small_step.py --out "$OUT/small_step-$gpu.json" 2>&1 | tee "$OUT/small_step.log" | tail -18 ;;
    *) echo "unknown step $s (steps: tests kernels layer model decode timeline train small compile)" ;;
  esac
done
echo "=== done ($(date +%T))"
