#!/usr/bin/env bash
# Run THERE (the GPU machine), from the repository root, after fetch.sh here; one call, ~5 min:
#
#   device run: bash benchmarks/device/check.sh   (carry [".whl", ".ref"], timeout_s 540)
#
# 1. the GPU tests (tests/test_gpu.py: CUDA fit == CPU fit to 1e-9 relative, CLI report on cuda),
# 2. the rib benchmark on cuda (LIB with the paper's settings on rib's checkpoint: timings, per
#    layer Λ and edges) when .ref/ holds the checkpoint,
# 3. 200 steps of the byte-LM recipe with accelerator auto (steps per second on the GPU).
# Logs go to $OUT (or ./device_out where OUT is unset, e.g. a dry run on a CPU machine).
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
PY="${PY:-python3}"
DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu: a dry run of this script on a CPU machine
if [[ -d .whl && "${WHEELS:-1}" == 1 ]]; then  # WHEELS=0: use the packages already installed (dry run)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
{
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$PY" -c "import torch, transformers, transformer_lens, lightning; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| lightning', lightning.__version__)"
} 2>&1 | tee "$OUT/env.txt"
"$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" || status=1
if [[ -d .ref/rib_modadd_seed0 ]]; then
    "$PY" benchmarks/lib_rib_reference.py --ref .ref/rib_modadd_seed0 --device "$DEVICE" --repeat 2 2>&1 \
        | tee "$OUT/rib_benchmark_$DEVICE.txt" || status=1
fi
run_dir="$(mktemp -d)"
TIMEFORMAT="byte-LM recipe, 200 steps (accelerator auto), wall %R s"  # bash's own timer: the image may lack bc
{ time "$PY" -m interp_train.cli fit --config recipes/text/baseline.yaml --trainer.max_steps 200 \
    --trainer.val_check_interval 100 --trainer.enable_progress_bar false --run_dir "$run_dir" \
    > "$OUT/recipe_text_200_steps.txt" 2>&1 || status=1; } 2>> "$OUT/recipe_text_200_steps.txt"
tail -3 "$OUT/recipe_text_200_steps.txt"
exit $status
