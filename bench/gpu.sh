#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one CUDA GPU: the engine's GPU tests, then the
# full-size training and generation benchmarks, most important first. Each step has its own
# time limit and the whole run a budget (BUDGET seconds, default 520): a step that would not
# fit is skipped and says so. Results go to $OUT/RESULTS.md (append them to bench/RESULTS.md by
# hand), the whole log to $OUT/gpu.log.
#
# Usage, from the repository root:  OUT=/tmp/gpu BUDGET=520 bash bench/gpu.sh
# ONLY="name name …" runs only those steps. The comparison with diffusers' own script runs when
# DIFFUSERS_EXAMPLES (default .whl/examples) holds examples/dreambooth/train_dreambooth_lora.py
# from a pinned checkout (DIFFUSERS_TAG, default v0.40.0) and python3 has torchvision.
# Python packages: the machine's python3 with torch (CUDA); if .whl/ holds wheels (diffusers,
# transformers, peft, …) they are installed first into /tmp/site, and .whl/bnb (an unpacked
# bitsandbytes) is put on the path, for machines that cannot reach a package index.
set -u
OUT=${OUT:-/tmp/dreambot-gpu}
BUDGET=${BUDGET:-520}
mkdir -p "$OUT"
LOG=$OUT/gpu.log
RESULTS=$OUT/RESULTS.md
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
deadline=$((SECONDS + BUDGET))

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
[ -d "$WHEELS/bnb" ] && export PYTHONPATH=$PWD/$WHEELS/bnb:$PYTHONPATH

# step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (less if the budget is
# nearly spent), its output into the log, its table (the last lines) onto the screen.
step() {
    local name=$1 limit=$2 left=$((deadline - SECONDS))
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        return
    fi
    if [ "$left" -lt 40 ]; then
        echo "== $name: skipped, $left s of the budget left" | tee -a "$LOG"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit $limit s)" | tee -a "$LOG"
    local began=$SECONDS lines
    lines=$(wc -l <"$LOG")
    timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    tail -n +"$((lines + 2))" "$LOG" |
        grep -E '^\||step [0-9]+/|passed|failed|skipped|Error|error:' | tail -n 24
    echo "   exit $rc after $((SECONDS - began)) s" | tee -a "$LOG"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c 'import torch, diffusers, transformers, peft, accelerate; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)'
    $PY -c 'import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)' 2>&1 | tail -1
} 2>&1 | tee -a "$LOG"

TRAIN=(bench/train.py --full --device "$DEVICE" --results "$RESULTS")
GEN=(bench/generate.py --full --device "$DEVICE" --results "$RESULTS" --repeats 3)
# The GPU tests first: they are the only check of the engine's CUDA-only code paths.
GPU_TESTS=(${PYTEST:-$PY -m pytest} tests/engine/test_gpu.py --noconftest -q -p no:cacheprovider
    -o addopts="" -W ignore::pytest.PytestConfigWarning)
step gpu-tests 120 "${GPU_TESTS[@]}" -k "not compiled_training"
step sd15-train-800-prior 150 $PY "${TRAIN[@]}" --full-steps 800 --class-generation 48
EXAMPLES=${DIFFUSERS_EXAMPLES:-.whl/examples}
if [ -f "$EXAMPLES/dreambooth/train_dreambooth_lora.py" ]; then
    step sd15-vs-diffusers 170 $PY bench/train.py --model sd15 --device "$DEVICE" --steps 100 \
        --warmup 10 --venv "$($PY -c 'import sys; print(sys.prefix)')" \
        --diffusers-examples "$EXAMPLES" --diffusers-version-label "${DIFFUSERS_TAG:-v0.40.0}" \
        --results "$RESULTS"
fi
step sd15-generate 110 $PY "${GEN[@]}"
# Compiled training: the tests (inductor on the tiny model, apart: each compiles), then SD 1.5
# with the UNet copy compiled (DREAMBOT_TRAIN_COMPILE=on): compilation falls in step 1
# (train_lora s holds it), s/step after --warmup leaves it out.
step gpu-tests-compiled-training 150 "${GPU_TESTS[@]}" -k compiled_training
step sd15-train-compile 200 $PY "${TRAIN[@]}" --full-steps 300 --warmup 20 \
    --cfg compile_backend=inductor
step sdxl-train-prior 90 $PY "${TRAIN[@]}" --arch sdxl --full-steps 30 --warmup 5
step sd15-generate-compiled 130 $PY "${GEN[@]}" --compile --no-reference
step sd15-train-ckpt 50 $PY "${TRAIN[@]}" --full-steps 100 --cfg gradient_checkpointing=true
step sd15-train-8bit 50 $PY "${TRAIN[@]}" --full-steps 100 --cfg optimizer=adamw8bit
step sdxl-train-ckpt 80 $PY "${TRAIN[@]}" --arch sdxl --full-steps 30 --warmup 5 \
    --cfg gradient_checkpointing=true
step sd15-train-no-prior 45 $PY "${TRAIN[@]}" --full-steps 100 --no-prior
step sdxl-train-no-prior 80 $PY "${TRAIN[@]}" --arch sdxl --full-steps 30 --warmup 5 --no-prior
step sdxl-generate 120 $PY "${GEN[@]}" --arch sdxl --repeats 2 --no-reference
# Channels-last memory order for the UNet copy (TrainConfig.channels_last, off by default):
# compare its s/step with sd15-train-800-prior's to decide the default.
step sd15-train-channels-last 60 $PY "${TRAIN[@]}" --full-steps 100 --cfg channels_last=true
echo "== done; budget left $((deadline - SECONDS)) s" | tee -a "$LOG"
