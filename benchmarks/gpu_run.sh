#!/usr/bin/env bash
# The GPU measurements in one command, on a machine with one CUDA GPU (python3 with torch and
# deepspeed importable; nothing is downloaded):
#
#     bash benchmarks/gpu_run.sh OUT_DIR [SHARED_DATA]
#
# 1. the `gpu` tests (the Trainer on CUDA trains what it trains on the CPU);
# 2. benchmarks/scaling.py --devices gpu: the product's Trainer and selector problem with
#    runtime.device=cuda, one configuration per call (each writes its own JSON, so one that
#    overruns its limit costs only itself): the SmolLM2-135M and 1.7B shapes with random
#    weights (`random:` presets: no checkpoint to copy; time and memory do not depend on the
#    weights' values), then the tiny model, offload last;
# 3. OUT_DIR/scaling_gpu.json: all of them merged. Merge it with the CPU results:
#    python benchmarks/scaling.py --merge CPU.json,OUT_DIR/scaling_gpu.json
# CONFIGS="model:stage ..." picks the configurations; DEVICES=cpu runs the same on the CPU (to
# check this script without a GPU: DEVICES=cpu CONFIGS=tiny:3). SWEEP_REPEATS (default 3)
# repeats each selector sweep point (median). On one H200 (2026-11-28, with the loop the
# Trainer replaced, sweeps once): 135M stages 0/2/3 took 24/28/78 s each, 1.7B stage 3 143 s,
# tiny 19-30 s; offload (3off) did not finish within 20 s.
set -u
out=${1:?usage: gpu_run.sh OUT_DIR [SHARED_DATA]}
shared=${2:-$(dirname "$0")/../../shared/data}
py=${PYTHON:-python3}
devices=${DEVICES:-gpu}
configs=${CONFIGS:-"random:smollm2-135m:0 random:smollm2-135m:2 random:smollm2-135m:3 \
random:smollm2-1.7b:3 tiny:0 tiny:3 random:smollm2-135m:3off"}
mkdir -p "$out/configs"
export HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $py -c "import torch, deepspeed, transformers as t; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, 'transformers', t.__version__)"
} > "$out/env.txt" 2>&1
if [ "$devices" = gpu ]; then
    timeout "${T_TESTS:-420}" $py -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
        > "$out/gpu_tests.log" 2>&1
    echo "gpu tests: exit $?" >> "$out/env.txt"
fi
merged=""
for config in $configs; do
    model=${config%:*}
    stage=${config##*:}
    name=$(echo "$config" | tr ':' '_')
    timeout "${T_CONFIG:-240}" $py benchmarks/scaling.py --devices "$devices" --world 1 \
        --models "$model" --stages "$stage" --selector-stages 3 --shared-data "$shared" \
        --threads 8 --steps 5 --repeats 5 --sweep-repeats "${SWEEP_REPEATS:-3}" \
        --out "$out/configs/$name" >> "$out/scaling.log" 2>&1
    echo "scaling $config: exit $?" >> "$out/env.txt"
    [ -f "$out/configs/$name/scaling.json" ] && merged="$merged,$out/configs/$name/scaling.json"
done
[ -n "$merged" ] && $py benchmarks/scaling.py --merge "${merged#,}" --out "$out/merged" \
    >> "$out/scaling.log" 2>&1 && cp "$out/merged/scaling.json" "$out/scaling_gpu.json"
cat "$out/env.txt"
