#!/usr/bin/env bash
# A/B: the layer benchmark (--quick: pkmem triton and the FFN) for the working tree and for an older
# commit, alternating, in one GPU session (host speed differs between machines: compare in one run).
#   here:   git archive REF src | (mkdir -p .ab/REF && tar -x -C .ab/REF)     (.ab is git-ignored)
#   device: bash benchmarks/ab.sh REF [ROUNDS]                                (carry .ab)
set -u
REF=$1
ROUNDS=${2:-2}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
for r in $(seq 1 "$ROUNDS"); do
  for side in old new; do
    src=$PWD/src
    [ "$side" = old ] && src=$PWD/.ab/$REF/src
    echo "=== round $r: $side ($src)"
    PYTHONPATH=$src timeout 150 python3 benchmarks/layer.py --quick --out "$OUT/ab-$side-$r.json" 2>&1 | tail -14
  done
done
