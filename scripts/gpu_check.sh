#!/usr/bin/env bash
# The GPU check, prepared to run in one call on a GPU machine: `bash scripts/gpu_check.sh [OUT]`
# from the repository root. Its Python (python3, or $PYTHON) must have torch with CUDA; Hydra and
# OmegaConf, which GPU images often lack, are installed from the wheels in .whl/ (made here with
# `make gpu-wheels`) when that folder is there. Writes into OUT (default $OUT, else gpu-check/):
#
#   device.txt       the GPU, torch and CUDA versions
#   tests.log        the test suite with every run it trains on CUDA (RANDFEAT_TEST_DEVICE=cuda)
#   runs.log         end-to-end `train.py device=cuda` runs: SGD, compile=true, 16 replicas with
#                    one rate each, ridge on samples (float64 and float32 products), the
#                    population fit
#   bench.log        `scripts/bench.py --device cuda`, and its bench-cuda.json
#   summary.txt      each stage's exit status
#
# Each stage has its own time limit, under 10 minutes in all (one call of a lent machine), and
# a failing stage does not stop the others. DEVICE=cpu runs the same stages on the CPU, to try
# the script where there is no GPU.
set -uo pipefail

out=${1:-${OUT:-gpu-check}}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
mkdir -p "$out"
: >"$out/summary.txt"

if [ -d .whl ]; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        .whl/*.whl || exit 1
    export PYTHONPATH=$site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

stage() {  # stage NAME SECONDS LOG COMMAND...: run with a time limit, append to LOG, note status
    local name=$1 seconds=$2 log=$3
    shift 3
    echo "== $name: $*" >>"$log"
    timeout "$seconds" "$@" >>"$log" 2>&1
    local status=$?
    echo "$name: exit $status" | tee -a "$out/summary.txt"
}

stage device 30 "$out/device.txt" "$python" -c "import torch
print('torch', torch.__version__, 'CUDA', torch.version.cuda)
if torch.cuda.is_available():
    print(torch.cuda.get_device_properties(0))"

# The suite in 8 workers of 2 CPU threads each where pytest-xdist is installed, else in one
# process.
workers=()
"$python" -c "import xdist" 2>/dev/null && workers=(-n 8)
stage tests 150 "$out/tests.log" env RANDFEAT_TEST_DEVICE="$device" OMP_NUM_THREADS=2 \
    "$python" -m pytest -q -rfE -p no:cacheprovider "${workers[@]}" tests

runs=$(mktemp -d)
train() {  # train NAME SECONDS OVERRIDES...
    local name=$1 seconds=$2
    shift 2
    stage "run $name" "$seconds" "$out/runs.log" "$python" train.py "device=$device" progress=false \
        "hydra.run.dir=$runs/$name" "$@"
}
train sgd 30 d=64 width=1024
train compile 60 d=64 width=1024 compile=true
train replicas 30 d=32 width=256 replicas=16 "optimizer.lr=[$(seq -s, 0.05 0.05 0.8)]"
train ridge 20 model=frozen optimizer=ridge d=64 width=2048 n_train=40000
train ridge_float32 20 model=frozen optimizer=ridge d=64 width=2048 n_train=40000 \
    optimizer.gram_products=float32
train population 30 fit=rf_population d=64 width=2048
# The records, for the steps/s and errors measured there.
for record in "$runs"/*/metrics.json; do
    echo "== $record" >>"$out/runs.log"
    cat "$record" >>"$out/runs.log"
done

stage bench 220 "$out/bench.log" "$python" scripts/bench.py --device "$device" \
    --out "$out/bench-$device.json"
