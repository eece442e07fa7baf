#!/usr/bin/env bash
# The GPU measurements in one command, on a machine with one CUDA GPU (python3 with torch and
# deepspeed; nothing is downloaded): bash benchmarks/gpu_run.sh OUT_DIR [SHARED_DATA]
# 1. the `gpu` tests; 2. benchmarks/scaling.py --devices gpu, one configuration per call (each
#    writes its own JSON, so one that overruns T_CONFIG costs only itself): the SmolLM2-135M and
#    1.7B shapes with random weights (time and memory do not depend on their values), then the
#    tiny model, offload last; 3. all of them merged into OUT_DIR/scaling_gpu.json, to merge with
#    the CPU results: python benchmarks/scaling.py --merge CPU.json,OUT_DIR/scaling_gpu.json
# CONFIGS="model:stage ..." picks the configurations; DEVICES=cpu runs them on the CPU (to check
# this script without a GPU: DEVICES=cpu CONFIGS=tiny:3). On one H200 (2026-12-04, the product's
# Trainer) the gpu tests took 197 s, 135M stages 0/3 19/140 s, and 1.7B stage 3 did not finish in
# 170 s (the copy of 2026-11-28: 143 s); a 15-minute lease holds the tests and about three configs.
set -u
out=${1:?usage: gpu_run.sh OUT_DIR [SHARED_DATA]}
shared=${2:-$(dirname "$0")/../../shared/data}
py=${PYTHON:-python3}
devices=${DEVICES:-gpu}
configs=${CONFIGS:-"random:smollm2-135m:0 random:smollm2-135m:2 random:smollm2-135m:3 \
random:smollm2-1.7b:3 tiny:0 tiny:3 random:smollm2-135m:3off"}
mkdir -p "$out/configs"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $py -c "import torch, deepspeed; print('torch', torch.__version__, deepspeed.__version__)"
} > "$out/env.txt" 2>&1
if [ "$devices" = gpu ]; then
    timeout 420 $py -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
        > "$out/gpu_tests.log" 2>&1
    echo "gpu tests: exit $?" >> "$out/env.txt"
fi
merged=""
for config in $configs; do
    name=$(echo "$config" | tr ':' '_')
    timeout "${T_CONFIG:-240}" $py benchmarks/scaling.py --devices "$devices" --world 1 \
        --models "${config%:*}" --stages "${config##*:}" --shared-data "$shared" --threads 8 \
        --steps 5 --repeats 5 --sweep-repeats 3 --out "$out/configs/$name" \
        >> "$out/scaling.log" 2>&1
    echo "scaling $config: exit $?" >> "$out/env.txt"
    [ -f "$out/configs/$name/scaling.json" ] && merged="$merged,$out/configs/$name/scaling.json"
done
[ -n "$merged" ] && $py benchmarks/scaling.py --merge "${merged#,}" --out "$out/merged" \
    >> "$out/scaling.log" 2>&1 && cp "$out/merged/scaling.json" "$out/scaling_gpu.json"
cat "$out/env.txt"
